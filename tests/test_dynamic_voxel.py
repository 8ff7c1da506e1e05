"""Dynamic-voxel detectors (DynamicVoxelNet): codegen/patches/dynamic_voxel.py and their export.

mmcv 2.1.0 has no CPU kernel for ``DynamicScatter``, so the original model cannot run here and
the exporter validates these models against the *patched* eager model (recipe
``reference="patched"``). What ties the patched code to mmdet3d is therefore checked here:

* the padded voxel encoder of PointPillars-DV against a readable per-pillar reference on the real
  KITTI frame (group points by coors, decorate, PFN layer, max), also with invalid (-1) points;
* every padded encoder forward against mmdet3d's own forward with only ``DynamicScatter``
  swapped for the pure-torch op (``dynamic_scatter.torch``, mmcv's CUDA semantics);
* both models' patched head outputs against mmdet3d's ``DynamicVoxelNet`` code path run the
  same way;
* the one-shot CLI export of both models (PT2 + ONNX, two point counts).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from mmcv.ops.voxelize import voxelization as mmcv_voxelization

from codegen import patches, sample
from codegen.configs import resolve_config
from codegen.generate import predict_context, run_tensor_path
from codegen.ops.scatter import scatter_to_bev
from codegen.recipes import recipe_for
from conftest import REPO, frame_path
from test_pipeline import cli

PP_DV = "pointpillars_dv_secfpn_8xb6-160e_kitti-3d-car"
SECOND_DV = "second_dv_secfpn_8xb6-80e_kitti-3d-car"
CONFIGS = (PP_DV, SECOND_DV)  # test_models checks that every committed wrapper is covered

PP_GRID = dict(voxel_size=[0.16, 0.16, 4], point_cloud_range=[0, -39.68, -3, 69.12, 39.68, 1])
SECOND_GRID = dict(voxel_size=[0.05, 0.05, 0.1], point_cloud_range=[0, -40, -3, 70.4, 40, 1])


def _randomise_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm running statistics (fresh ones are mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ------------------------------------------------------------------ recipe and scatter op


def test_recipe_uses_padded_encoders_and_middle_encoders():
    def recipe(config):
        return recipe_for(sample.load_config(resolve_config(config)).model)

    pp, second = recipe(PP_DV), recipe(SECOND_DV)
    assert pp.name == second.name == "dynamic_voxelnet"
    assert pp.reference == second.reference == "patched"
    assert pp.inputs == ("inputs.voxels.voxels", "inputs.voxels.coors")
    assert pp.patches == ("dynamic_voxelnet.static_batch_size", "dynamic_pillar_feature_net.padded", "pillar_scatter.padded")
    assert second.patches == (
        "dynamic_voxelnet.static_batch_size",
        "dynamic_simple_vfe.padded",
        "sparse_encoder.padded",
        "spconv.conv",
        "spconv.dense",
    )
    # the hard-voxel PointPillars keeps its own scatter patch and the original as reference
    hard = recipe("pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car")
    assert "pillar_scatter.vectorized" in hard.patches and "pillar_scatter.padded" not in hard.patches
    assert hard.reference == "original"


def test_scatter_to_bev_drops_invalid_rows():
    g = torch.Generator().manual_seed(0)
    batch, ny, nx, ch = 2, 4, 5, 3
    cells = torch.randperm(batch * ny * nx, generator=g)[:9]
    coors = torch.stack([cells // (ny * nx), torch.zeros_like(cells), cells // nx % ny, cells % nx], 1).int()
    feats = torch.randn(9, ch, generator=g)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    # invalid rows: garbage features and coors -1 (as the padded encoders write them) or, for
    # row 1, the cell of a valid row: only ``valid`` decides
    padded_feats = torch.where(valid[:, None], feats, torch.randn(9, ch, generator=g))
    padded_coors = torch.where(valid[:, None], coors, torch.full_like(coors, -1))
    padded_coors[1] = coors[0]
    out = scatter_to_bev(padded_feats, padded_coors, batch, ny, nx, valid=valid)
    expected = torch.zeros(batch, ch, ny, nx)
    for f, (b, _, y, x), ok in zip(feats, coors.tolist(), valid):
        if ok:
            expected[b, :, y, x] = f
    assert torch.equal(out, expected)
    # the first rows invalid (invalid rows repeat the first valid one), and none valid
    late = valid.clone()
    late[0] = False
    expected[coors[0, 0], :, coors[0, 2], coors[0, 3]] = 0
    assert torch.equal(scatter_to_bev(padded_feats, padded_coors, batch, ny, nx, valid=late), expected)
    none = torch.zeros_like(valid)
    assert torch.equal(scatter_to_bev(padded_feats, padded_coors, batch, ny, nx, valid=none), torch.zeros(batch, ch, ny, nx))
    # without valid every row is scattered, as before
    every = torch.zeros(batch, ch, ny, nx)
    for f, (b, _, y, x) in zip(feats, coors.tolist()):
        every[b, :, y, x] = f
    assert torch.equal(scatter_to_bev(feats, coors, batch, ny, nx), every)


# ------------------------------------------------------------------ (a) the voxel encoder on KITTI


@pytest.fixture(scope="module")
def pp_dv():
    """PointPillars-DV (random weights, non-trivial BatchNorm) and its real KITTI sample."""
    frame_path("KittiDataset")
    model = sample.load_model(PP_DV)
    _randomise_norms(model.voxel_encoder)
    data = sample.sample_frame(model, sample.default_frame_ref(model.cfg), 0).data
    return model, data


def reference_pillar_features(encoder, points: torch.Tensor, coors: torch.Tensor):
    """Readable DynamicPillarFeatureNet (one PFN layer, max), in float64: group the points by
    their (valid) voxel coors, visit pillars in sorted coordinate order, decorate every member
    point with its offset from the pillar's point mean and from the pillar centre, apply
    Linear -> BatchNorm (eval) -> ReLU and take the max over the members."""
    assert encoder._with_cluster_center and encoder._with_voxel_center and not encoder._with_distance
    assert len(encoder.pfn_layers) == 1 and not encoder.pfn_scatter.average_points
    linear, bn, _ = encoder.pfn_layers[0]
    weight = linear.weight.detach().double().numpy()
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    pts = points.double().numpy()
    members: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, coors.tolist())):
        if min(key) >= 0:
            members.setdefault(key, []).append(i)
    keys = sorted(members)
    rows = []
    for b, z, y, x in keys:
        p = pts[members[(b, z, y, x)]]
        centre = np.array([x * encoder.vx + encoder.x_offset, y * encoder.vy + encoder.y_offset, z * encoder.vz + encoder.z_offset])
        decorated = np.concatenate([p, p[:, :3] - p[:, :3].mean(axis=0), p[:, :3] - centre], axis=1)
        h = decorated @ weight.T
        h = (h - mean) / np.sqrt(var + bn.eps) * gamma + beta
        rows.append(np.maximum(h, 0).max(axis=0))
    return np.stack(rows), np.array(keys)


@pytest.mark.parametrize("invalid_every", [0, 7], ids=["frame", "with-invalid-points"])
def test_pillar_encoder_equals_readable_reference(pp_dv, invalid_every):
    model, data = pp_dv
    points = data["inputs"]["voxels"]["voxels"]
    coors = data["inputs"]["voxels"]["coors"].clone()
    if invalid_every:  # points outside the grid: dynamic voxelization writes -1 coors
        coors[::invalid_every] = -1
    ref_feats, ref_coors = reference_pillar_features(model.voxel_encoder, points, coors)
    m, n = len(ref_coors), points.shape[0]
    assert 1000 < m < n  # real pillars with several points each

    with torch.no_grad(), patches.applied(("dynamic_pillar_feature_net.padded",)):
        feats, voxel_coors = model.voxel_encoder(points.clone(), coors.clone())
    assert feats.shape == (n, 64) and voxel_coors.shape == (n, 4)
    np.testing.assert_allclose(feats[:m].double().numpy(), ref_feats, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(voxel_coors[:m].numpy(), ref_coors)
    # padding rows: zero features, coors -1 (what the middle encoders skip)
    assert (voxel_coors[m:] == -1).all() and (feats[m:] == 0).all()


# ------------------------------------------------------------------ padded forwards == mmdet3d's


VFE_GRID = dict(voxel_size=[0.2, 0.2, 0.4], point_cloud_range=SECOND_GRID["point_cloud_range"])


def _encoder(name: str):
    """(encoder, its grid): the dynamic encoders in several settings (more than the two configs
    use: stacked layers, so the voxel -> point gather between layers runs too)."""
    from mmdet3d.models.voxel_encoders import DynamicPillarFeatureNet, DynamicSimpleVFE, DynamicVFE

    factories = {
        "pillar-max-2layers-distance": (lambda g: DynamicPillarFeatureNet(4, (32, 64), with_distance=True, **g), PP_GRID),
        "pillar-avg": (lambda g: DynamicPillarFeatureNet(4, (64,), mode="avg", **g), PP_GRID),
        "vfe-max-2layers": (lambda g: DynamicVFE(4, [32, 64], True, True, True, **g), VFE_GRID),
        "vfe-avg": (lambda g: DynamicVFE(4, [16], False, True, False, mode="avg", **g), SECOND_GRID),
        "simple-vfe": (lambda g: DynamicSimpleVFE(**g), SECOND_GRID),
    }
    factory, grid = factories[name]
    torch.manual_seed(0)
    encoder = factory(grid).eval()
    _randomise_norms(encoder)
    return encoder, grid


ENCODER_PATCHES = {
    "DynamicPillarFeatureNet": "dynamic_pillar_feature_net.padded",
    "DynamicVFE": "dynamic_vfe.padded",
    "DynamicSimpleVFE": "dynamic_simple_vfe.padded",
}


# batch size 1 (as exported): the pillar grids are small enough to group the points by counting
# (ops.dynamic_scatter._group_dense); without a static batch size they are sorted
@pytest.mark.parametrize("batch_size", [None, 1])
@pytest.mark.parametrize("name", ["pillar-max-2layers-distance", "pillar-avg", "vfe-max-2layers", "vfe-avg", "simple-vfe"])
def test_padded_encoder_equals_mmdet3d_forward(name, batch_size, kitti_points):
    encoder, grid = _encoder(name)
    pts = torch.from_numpy(kitti_points)
    coors = mmcv_voxelization(pts, grid["voxel_size"], grid["point_cloud_range"], -1, -1)  # [N, 3] z, y, x
    inside = (coors >= 0).all(1)  # mmdet3d's pipeline range-filters the points first
    pts, coors = pts[inside].contiguous(), torch.nn.functional.pad(coors[inside], (1, 0), value=0)

    with torch.no_grad():
        with patches.applied(("dynamic_scatter.torch",)):  # mmdet3d's code, the op on the CPU
            ref_feats, ref_coors = encoder(pts.clone(), coors.clone())
        with patches.applied((ENCODER_PATCHES[type(encoder).__name__],), batch_size=batch_size):
            feats, voxel_coors = encoder(pts.clone(), coors.clone())
    m = ref_coors.shape[0]
    assert feats.shape[0] == pts.shape[0] > m > 100
    torch.testing.assert_close(feats[:m], ref_feats, atol=0, rtol=0)
    assert torch.equal(voxel_coors[:m], ref_coors)
    assert (voxel_coors[m:] == -1).all() and (feats[m:] == 0).all()


@pytest.fixture(scope="module")
def second_dv():
    frame_path("KittiDataset")
    model = sample.load_model(SECOND_DV)
    return model, sample.sample_frame(model, sample.default_frame_ref(model.cfg), 0).data


@pytest.mark.parametrize("config", CONFIGS)
def test_patched_model_equals_mmdet3d_code_path(config, request):
    """Head outputs of the export patches == mmdet3d's DynamicVoxelNet code (extract_feat with
    .item(), canvases, the per-sample scatter loop, spconv's kernels) with only the op swapped."""
    model, data = request.getfixturevalue("pp_dv" if config == PP_DV else "second_dv")
    recipe = recipe_for(model.cfg.model)
    with torch.no_grad():
        with patches.applied(("dynamic_scatter.torch",)):
            ref = run_tensor_path(model, recipe, sample.clone_tree(data["inputs"]))
        with patches.applied(recipe.patches, batch_size=1):
            out = run_tensor_path(model, recipe, sample.clone_tree(data["inputs"]))
    ref, out = sample.tensors(ref), sample.tensors(out)
    assert len(ref) == len(out) == 3
    for r, o in zip(ref, out):
        assert r.abs().max() > 0
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6)


def test_predict_runs_under_the_recipe_predict_patches(pp_dv):
    """mmdet3d's full predict (voxelization, head, box decoding, NMS) fails on this CPU and runs
    under the recipe's ``predict_patches`` (what bench/models.py and ``--outputs boxes``' reference
    use)."""
    model, data = pp_dv
    recipe = recipe_for(model.cfg.model)
    with torch.no_grad(), pytest.raises(Exception, match="not found|CUDA"):
        model.predict(sample.clone_tree(data["inputs"]), data["data_samples"])
    with torch.no_grad(), predict_context(recipe, 1):
        pred = model.predict(sample.clone_tree(data["inputs"]), data["data_samples"])[0].pred_instances_3d
    n = pred.scores_3d.shape[0]
    assert n > 0 and pred.bboxes_3d.tensor.shape == (n, 7) and torch.isfinite(pred.bboxes_3d.tensor).all()


# ------------------------------------------------------------------ (b, c) one-shot CLI export


def _check_export(out, fmt_runtimes: set[str]) -> dict:
    meta = json.loads((out / "metadata.json").read_text())
    v = meta["validation"]
    assert v["passed"], v["summary"]
    assert v["reference"] == "patched"
    assert (out / "validation.txt").read_text().startswith("validation against the patched eager model")
    assert meta["recipe"] == "dynamic_voxelnet"
    assert meta["export_info"]["input_names"] == ["voxels", "coors"]
    assert set(v["max_abs_diff"]) == {"eager-patched"} | fmt_runtimes
    assert len({r["size"] for r in v["rows"]}) == 2, "two different point counts validated"
    assert {r["runtime"] for r in v["rows"] if r["ok"]} == {"eager-patched"} | fmt_runtimes
    wrapper = next(out.glob("wrapper_*.py"))
    assert wrapper.read_text() == (REPO / "generated" / wrapper.name).read_text()
    return meta


def test_pointpillars_dv_exports_and_validates(tmp_path):
    frame_path("KittiDataset")
    out = tmp_path / "out"
    proc = cli("--config", PP_DV, "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = _check_export(out, {"pt2", "onnx"})
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
    assert meta["validation"]["max_abs_diff"]["pt2"] < 1e-5
    # the point count is its only input symbol; the encoder is fixed-shape (one row per point),
    # the fused first conv sizes two things from the data (unbacked): the pillars among the rows
    # and the output cells they reach
    program = torch.export.load(str(out / "model.pt2"))
    assert sorted(str(s)[0] for s in program.range_constraints) == ["s", "u", "u"]
    # the cluster mean and the max share one grouping of the points: one count over the grid
    # (a CumSum of its 496 * 432 cells), not one per DynamicScatter
    graph = onnx.load(str(out / "model.onnx")).graph
    sizes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    assert [sizes.get(n.output[0]) for n in graph.node if n.op_type == "CumSum"].count([496 * 432]) == 1


def test_second_dv_exports_and_validates(tmp_path):
    # ONNX conversion of the sparse encoder graph (~16k nodes) takes about 2 minutes on 2 shared
    # cores: under the 3 minutes that would make this a PT2-only check
    frame_path("KittiDataset")
    out = tmp_path / "out"
    proc = cli("--config", SECOND_DV, "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = _check_export(out, {"pt2", "onnx"})
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
