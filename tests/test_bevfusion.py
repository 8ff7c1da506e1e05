"""BEVFusion (``projects/BEVFusion`` of the mmdetection3d source checkout in ../shared/third_party).

The checkout is used as a user would: ``--source-root`` puts it on ``sys.path`` for the config's
``custom_imports``; its compiled ops are not built here, ``codegen.checkout`` provides stand-ins.
Checked here: the flag and its errors, the stand-ins against mmcv's CPU kernel / codegen's
bev_pool, the pretrained-weights URL never being fetched, the export patches against BEVFusion's
own code on the nuScenes frame (lidar path bit-exact; head bit-exact where no scores tie) and the
end-to-end exports (lidar-only PT2 in CI; its ONNX and the lidar-camera model are slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codegen import checkout
from codegen import sample as smp
from conftest import REPO, cli, frame_path
from test_pipeline import error_lines

LIDAR = "bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d"
LIDAR_CAM = "bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d"


def source_root() -> Path:
    root = checkout.default_root()
    if not (root / "projects" / "BEVFusion").is_dir():
        pytest.skip(f"mmdetection3d checkout absent: {root} (set {checkout.ENV} or provide ../shared/third_party)")
    return root


def config_path(name: str) -> Path:
    return source_root() / "projects" / "BEVFusion" / "configs" / f"{name}.py"


@pytest.fixture(scope="module")
def lidar_model():
    frame_path("NuScenesDataset")
    model = smp.load_model(str(config_path(LIDAR)))
    return model, smp.sample_frame(model, smp.default_frame_ref(model.cfg))


# ------------------------------------------------------------------------------ --source-root


@pytest.mark.parametrize(
    "root, needle",
    [("missing", "no such folder"), ("empty", "not an mmdetection3d checkout"), ("no_bevfusion", "not found in --source-root")],
)
def test_bad_source_root_is_one_clear_error(root, needle, tmp_path):
    config = "projects/BEVFusion/configs/" + LIDAR + ".py"
    folder = tmp_path / root
    if root != "missing":
        folder.mkdir()
    if root == "no_bevfusion":
        (folder / "projects").mkdir()
    out = tmp_path / "out"
    proc = cli("--config", config, "--source-root", str(folder), "--device", "cpu", "--output-dir", str(out))
    assert proc.returncode == 2
    errors = error_lines(proc)
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_project_config_without_a_checkout_says_to_pass_source_root(tmp_path):
    """A BEVFusion config copied out of its checkout, no default checkout: one error naming the flag."""
    copied = tmp_path / "bevfusion.py"
    text = config_path(LIDAR).read_text().replace("../../../configs/_base_/default_runtime.py", str(source_root() / "configs/_base_/default_runtime.py"))
    copied.write_text(text)
    proc = cli("generate", "--config", str(copied), "--device", "cpu", env={checkout.ENV: str(tmp_path / "none")})
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "imports projects.BEVFusion.bevfusion" in errors[0] and "--source-root" in errors[0]


def test_checkout_configs_are_recorded_relative_to_the_root():
    from codegen.configs import resolve_config

    rel = f"projects/BEVFusion/configs/{LIDAR}.py"
    by_path = resolve_config(str(config_path(LIDAR)))
    assert by_path.ref == rel and by_path.path == config_path(LIDAR).resolve()
    assert resolve_config(rel).path == by_path.path  # relative to the (default) root


# ------------------------------------------------------------------------ stand-ins, weights


def test_stand_ins_equal_the_kernels(lidar_model, nuscenes_points):
    """BEVFusion's ``Voxelization`` on the stand-in = mmcv's CPU kernel with (x, y, z) coors;
    BEVFusion's own ``bev_pool`` (sort, intervals, stand-in kernel) = codegen's on the frame."""
    import mmcv.ops
    from projects.BEVFusion.bevfusion.ops import Voxelization, bev_pool

    assert checkout.is_stand_in("projects.BEVFusion.bevfusion.ops.voxel.voxel_layer")
    points = torch.from_numpy(nuscenes_points.copy())
    cfg = dict(voxel_size=[0.075, 0.075, 0.2], point_cloud_range=[-54.0, -54.0, -5.0, 54.0, 54.0, 3.0], max_num_points=10)
    ours = Voxelization(**cfg, max_voxels=(120000, 160000)).eval()(points)
    mmcv_out = mmcv.ops.Voxelization(**cfg, max_voxels=(120000, 160000)).eval()(points)
    assert ours[0].shape[0] > 10000
    assert torch.equal(ours[0], mmcv_out[0]) and torch.equal(ours[2], mmcv_out[2])
    assert torch.equal(ours[1], mmcv_out[1].flip(1))

    from codegen.ops.bev_pool import bev_pool as codegen_bev_pool

    # cells from the frame's points on a 0.3 m grid; small integer features sum exactly in any order
    cells = torch.floor((points[:, :3] + torch.tensor([54.0, 54.0, 10.0])) / torch.tensor([0.3, 0.3, 20.0])).long()
    coords = torch.cat([cells, torch.zeros_like(cells[:, :1])], 1)
    coords = coords[((cells >= 0) & (cells < torch.tensor([360, 360, 1]))).all(1)]
    feats = torch.randint(-8, 8, (coords.shape[0], 16), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(bev_pool(feats, coords, 1, 1, 360, 360), codegen_bev_pool(feats, coords, 1, 1, 360, 360))



def test_camera_features_outer_product_equals_bevfusion():
    """The patched ``DepthLSSTransform.get_cam_feats`` (outer product formed in the output's
    ``[B, N, D, fH, fW, C]`` order, no permute of the 118x larger result) gives BEVFusion's
    tensor bit for bit, on the lidar-camera config's view transform with random weights."""
    checkout.activate(source_root())
    from projects.BEVFusion.bevfusion.depth_lss import DepthLSSTransform

    from codegen.patches.bevfusion import depth_lss_get_cam_feats

    torch.manual_seed(0)
    bounds = dict(xbound=[-54.0, 54.0, 0.3], ybound=[-54.0, 54.0, 0.3], zbound=[-10.0, 10.0, 20.0], dbound=[1.0, 60.0, 0.5])
    vt = DepthLSSTransform(in_channels=256, out_channels=80, image_size=[256, 704], feature_size=[32, 88], downsample=2, **bounds).eval()
    x = torch.randn(1, 2, 256, 32, 88)
    d = torch.rand(1, 2, 1, 256, 704) * (torch.rand(1, 2, 1, 256, 704) < 0.05) * 60  # sparse lidar depths
    with torch.no_grad():
        original = vt.get_cam_feats(x, d)
        ours = depth_lss_get_cam_feats(vt, x, d)
    assert original.shape == ours.shape == (1, 2, 118, 32, 88, 80)
    assert ours.is_contiguous() and not original.is_contiguous()
    assert torch.equal(ours, original)


def test_per_point_3x3_products_equal_the_matmul():
    """``get_geometry``'s per-point 3x3 products as broadcast multiply-adds (``_apply3x3``, no
    per-point GEMM in onnxruntime) equal BEVFusion's ``m.view(..., 3, 3).matmul(p.unsqueeze(-1))``
    bit for bit, so the frustum points land in the same BEV cells."""
    from codegen.patches.bevfusion import _apply3x3

    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        m = torch.randn(2, 6, 3, 3, generator=gen)
        p = torch.randn(2, 6, 20, 8, 11, 3, generator=gen) * 30
        ref = m.view(2, 6, 1, 1, 1, 3, 3).matmul(p.unsqueeze(-1)).squeeze(-1)
        assert torch.equal(_apply3x3(m, p), ref)

def test_pretrained_backbone_url_is_not_fetched():
    from codegen.configs import resolve_config

    cfg = smp.load_config(resolve_config(str(config_path(LIDAR_CAM))))
    logged: list[str] = []
    model = smp.build_model(cfg, "cpu", logged.append)  # would download the Swin weights otherwise
    assert len(logged) == 1 and "model.img_backbone.init_cfg" in logged[0] and "https://" in logged[0]
    assert type(model.img_backbone).__name__ == "SwinTransformer"
    assert cfg.model.img_backbone.init_cfg["type"] == "Pretrained"  # the caller's config is untouched


# ----------------------------------------------------------------------- patches vs original


def test_patched_lidar_path_equals_bevfusion(lidar_model):
    """extract_feat (in-graph voxelization, sparse encoder) is bit-exact; the head patch too once
    the BEV features have no tied scores (random weights give large equal-score regions, where the
    original's argsort has no tie rule: see patches.bevfusion.top_k_by_score)."""
    from codegen import patches
    from codegen.patches.bevfusion import LIDAR_PATCHES, batch_metas

    from codegen.validate import one_thread

    model, s = lidar_model
    metas = batch_metas(s.data["inputs"])
    with torch.no_grad(), one_thread():  # spconv's CPU kernels race with more threads
        original = model.extract_feat(smp.clone_tree(s.data["inputs"]), metas)
        with patches.applied(LIDAR_PATCHES, batch_size=1):
            patched = model.extract_feat(smp.clone_tree(s.data["inputs"]), metas)
        assert original[0].shape == (1, 512, 180, 180) and torch.equal(original[0], patched[0])
        feats = [original[0] + torch.randn(original[0].shape, generator=torch.Generator().manual_seed(0))]
        (ref,) = model.bbox_head(feats, metas)
        ref_labels = model.bbox_head.query_labels
        with patches.applied(LIDAR_PATCHES, batch_size=1):
            (got,) = model.bbox_head(feats, metas)
        assert torch.equal(model.bbox_head.query_labels, ref_labels)
    assert set(got[0]) == set(ref[0])
    for key in ref[0]:
        assert torch.equal(got[0][key], ref[0][key]), key


def test_top_k_breaks_ties_by_lower_index():
    from codegen.patches.bevfusion import top_k_by_score

    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.0, 0.7, 0.5]])
    assert top_k_by_score(scores, 5).tolist() == [[1, 3, 5, 0, 2]]


def test_validation_accepts_another_choice_among_tied_queries(lidar_model):
    """Random weights make most of the 200 selected scores ties (empty BEV cells): a runtime that
    picks other cells among them (onnxruntime does) is compared with the eager model run on its
    choice (patches.bevfusion.reselect_queries); a choice that is not a top-k is not accepted."""
    from codegen.export import import_wrapper
    from codegen.patches.bevfusion import _mask_ties, forced_queries, reselect_queries

    model, s = lidar_model
    module = import_wrapper(REPO / "generated" / "wrapper_bevfusion_lidar_voxel0075_second_secfpn_8xb4_cyclic_20e_nus_3d.py")
    wrapper = module.ExportWrapper(model).eval()
    args = tuple(module.flat_inputs(s.data).values())
    names = list(module.OUTPUT_NAMES)
    at = names.index("query_index")
    with torch.no_grad():
        ref = [o.numpy() for o in wrapper(*args)]
        index = torch.from_numpy(ref[at])
        scores = np.take_along_axis(ref[names.index("query_heatmap_score")], ref[names.index("query_labels")][:, None], 1)
        assert len(np.unique(scores)) < 20, "the frame's selection is dominated by tied scores"
        # another valid top-k: the queries in another order, one swapped for an unselected cell of equal score
        heat = torch.sigmoid(torch.from_numpy(ref[names.index("dense_heatmap")])).flatten()
        cells, selected = 180 * 180, index[0].tolist()
        other_index, swapped = index.flip(-1).clone(), False
        for q, i in enumerate(selected):
            if i // cells in (8, 9):  # classes whose every cell is a local maximum (nuScenes)
                same = torch.nonzero(heat == heat[i]).flatten().tolist()
                twin = next((j for j in same if j // cells == i // cells and j not in selected), None)
                if twin is not None:
                    other_index[0, len(selected) - 1 - q], swapped = twin, True
                    break
        assert swapped, "no unselected cell ties with a selected one"
        with forced_queries(other_index):
            other = [o.numpy() for o in wrapper(*args)]
        alt = reselect_queries(wrapper, names, args, other, ref, 1e-4, 1e-4)
        assert alt is not None
        for name, a, b in zip(names, alt, other):
            np.testing.assert_array_equal(a, b, err_msg=name)
        # "is this cell a local maximum" ties in flat regions: a zeroed score there is accepted,
        # a zeroed score at a strict maximum is not
        ties = _mask_ties(model.bbox_head, ref[names.index("dense_heatmap")], ref[at], 1e-4, 1e-4)
        qscore = ref[names.index("query_heatmap_score")]
        for wanted in (True, False):
            spot = tuple(np.argwhere((ties == wanted) & (qscore > 0))[0])
            masked = [o.copy() for o in ref]
            masked[names.index("query_heatmap_score")][spot] = 0.0
            alt = reselect_queries(wrapper, names, args, masked, ref, 1e-4, 1e-4)
            assert (alt is not None) == wanted
        # the lowest-scoring cells are no top-k
        bad_index = torch.argsort(heat, stable=True)[:200][None]
        with forced_queries(bad_index):
            bad = [o.numpy() for o in wrapper(*args)]
        assert reselect_queries(wrapper, names, args, bad, ref, 1e-4, 1e-4) is None


def test_last_write_wins_without_a_sort():
    """The lidar depth image's scatter (``patches.bevfusion._last_write``): each cell gets the
    value of its last row, as a serial ``out[cell] = values``; rows outside ``[0, size)`` drop."""
    from codegen.ops.points import export_forms
    from codegen.patches.bevfusion import _last_write

    g = torch.Generator().manual_seed(0)
    cell = torch.randint(-3, 53, (4000,), generator=g)  # ~80 rows a cell
    values = torch.randn(4000, generator=g)
    expected = torch.zeros(50)
    for c, v in zip(cell.tolist(), values.tolist()):
        if 0 <= c < 50:
            expected[c] = v
    assert torch.equal(_last_write(cell, values, 50), expected)
    program = torch.export.export(_LastWrite(), (cell, values), strict=False)
    with export_forms(iree=True):
        iree_program = torch.export.export(_LastWrite(), (cell, values), strict=False)
    for p in (program, iree_program):
        ops = {str(n.target) for n in p.graph.nodes if n.op == "call_function"}
        assert not any("sort" in op for op in ops), ops
        assert torch.equal(p.module()(cell, values), expected)


class _LastWrite(torch.nn.Module):
    def forward(self, cell, values):
        from codegen.patches.bevfusion import _last_write

        return _last_write(cell, values, 50)


@pytest.mark.slow
def test_patched_camera_branch_equals_bevfusion():
    """Camera branch on the six nuScenes images: the lidar depth image is bit-exact; the fused
    features differ only through the cofactor 3x3 inverse (torch.inverse has no ONNX form)."""
    from codegen import patches
    from codegen.patches.bevfusion import CAMERA_PATCHES, LIDAR_PATCHES, batch_metas
    from codegen.validate import one_thread

    frame_path("NuScenesDataset")
    model = smp.load_model(str(config_path(LIDAR_CAM)))
    s = smp.sample_frame(model, smp.default_frame_ref(model.cfg))
    depths = []
    cls = type(model.view_transform)

    def extract_keeping_depth():
        """``extract_feat`` with the depth image that reaches ``get_cam_feats`` (the original's
        or, under the patches, the patched one) kept in ``depths``."""
        cam_feats = cls.get_cam_feats

        def keep_depth(self, x, d):
            depths.append(d)
            return cam_feats(self, x, d)

        cls.get_cam_feats = keep_depth
        try:
            return model.extract_feat(smp.clone_tree(s.data["inputs"]), metas)
        finally:
            cls.get_cam_feats = cam_feats

    metas = batch_metas(s.data["inputs"])
    with torch.no_grad(), one_thread():  # spconv's CPU kernels race with more (lidar branch: 4e-6)
        original = extract_keeping_depth()
        with patches.applied(LIDAR_PATCHES + CAMERA_PATCHES, batch_size=1):
            patched = extract_keeping_depth()
    assert depths[0].shape == (1, 6, 1, 256, 704) and int((depths[0] > 0).sum()) > 1000
    assert torch.equal(depths[0], depths[1])
    torch.testing.assert_close(patched[0], original[0], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ end to end


def _export(name: str, fmt: str, tmp_path) -> dict:
    frame_path("NuScenesDataset")
    out = tmp_path / "out"
    root = source_root()
    proc = cli("--config", str(config_path(name)), "--source-root", str(root), "--output-dir", str(out), "--device", "cpu", "--format", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_config"] == f"projects/BEVFusion/configs/{name}.py"
    assert meta["validation"]["passed"] and meta["validation"]["reference"] == "patched"
    runtimes = {"both": {"eager-patched", "pt2", "onnx"}}.get(fmt, {"eager-patched", fmt})
    assert set(meta["validation"]["max_abs_diff"]) == runtimes
    assert max(meta["validation"]["max_abs_diff"].values()) < 1e-4
    assert len({r["size"] for r in meta["validation"]["rows"]}) == 2, "two point counts validated"
    names = [o["name"] for o in meta["outputs"]]
    assert {"center", "heatmap", "query_labels", "dense_heatmap"} <= set(names)
    wrapper = next(out.glob("wrapper_*.py"))
    assert wrapper.read_text() == (REPO / "generated" / wrapper.name).read_text()
    return meta


def test_bevfusion_lidar_exports_pt2_and_matches(tmp_path):
    """``mmdet3d-export --config <checkout>/projects/BEVFusion/configs/<lidar>.py --source-root
    <checkout>``: points in (voxelized in the graph), TransFusion head out."""
    meta = _export(LIDAR, "pt2", tmp_path)
    assert meta["export_info"]["input_names"] == ["points"]


@pytest.mark.slow
def test_bevfusion_lidar_onnx(tmp_path):
    _export(LIDAR, "both", tmp_path)


@pytest.mark.slow  # ~8 min: ONNX conversion, then iree-compile (~3 min)
def test_bevfusion_lidar_compiles_in_iree_and_matches(tmp_path):
    """The TransFusion decoder's cross-attention over 32400 BEV cells validates in IREE since its
    long sums are split: IREE's fused attention per block of 144 cells
    (``graph_forms.split_long_reductions``' fused attentions; one fused attention over all cells:
    3.7e-3 off, and in order, unsplit: ``dim`` 1.9e-4 off); its sparse convolutions' matmuls are
    not data-tiled
    (``codegen.iree.GATHERED_ROWS_MIN_K``) unless the convolutions go through im2col (a CPU
    without AVX-512)."""
    from codegen.iree import IM2COL_CONVS, MATMUL_DATA_TILING

    meta = _export(LIDAR, "iree", tmp_path)
    assert "attention node_bmm_3 over 32400 keys as one fused attention per block of 144 (IREE's online_attention)" in meta["iree"]["graph_rewrites"]
    assert "1 OnlineAttention node(s) as iree_linalg_ext.online_attention" in meta["iree"]["graph_rewrites"]
    assert (MATMUL_DATA_TILING in meta["iree"]["flags"]) == (IM2COL_CONVS in meta["iree"]["flags"])


@pytest.mark.slow
def test_bevfusion_lidar_camera_exports_and_matches(tmp_path):
    """Points, the six images and their calibrations in; same head out."""
    meta = _export(LIDAR_CAM, "both", tmp_path)
    assert meta["export_info"]["input_names"] == ["points", "imgs", "cam2img", "cam2lidar", "img_aug_matrix", "lidar2img"]


@pytest.mark.slow  # ~9 min: ONNX conversion ~7 min, iree-compile ~3.5 min
def test_bevfusion_lidar_camera_compiles_in_iree_and_matches(tmp_path):
    """The camera model in IREE: its lidar depth image's last-write scatter has no sort (IREE's
    sort is O(n^2): validation ran 15 min without finishing), its depth scatter max is IREE's
    ScatterND form."""
    meta = _export(LIDAR_CAM, "iree", tmp_path)
    assert any("(1-D max) as ScatterND" in r for r in meta["iree"]["graph_rewrites"])
