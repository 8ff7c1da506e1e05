"""codegen.ops.sparse_conv against spconv 2.3.8 (CPU) on active sites of real frames."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from codegen.validate import one_thread

spconv = pytest.importorskip("spconv.pytorch")

from codegen.ops import sparse_conv as sc  # noqa: E402
from export_check import assert_exports  # noqa: E402

SECOND_GRID = dict(voxel=(0.05, 0.05, 0.1), lo=(0.0, -40.0, -3.0), hi=(70.4, 40.0, 1.0), shape=[41, 1600, 1408])
CENTERPOINT_GRID = dict(voxel=(0.075, 0.075, 0.2), lo=(-54.0, -54.0, -5.0), hi=(54.0, 54.0, 3.0), shape=[41, 1440, 1440])


def active_sites(points: np.ndarray, grid: dict, seed: int = 0) -> torch.Tensor:
    """Occupied voxels of a real sweep as spconv indices [N, 4] int32 (batch, z, y, x), in a
    seeded random order (a voxelizer's order is not sorted either)."""
    xyz = torch.from_numpy(points[:, :3].copy())
    lo, hi, voxel = (torch.tensor(grid[k]) for k in ("lo", "hi", "voxel"))
    keep = ((xyz >= lo) & (xyz < hi)).all(1)
    xyz_idx = torch.floor((xyz[keep] - lo) / voxel).long()
    zyx = torch.unique(xyz_idx[:, [2, 1, 0]], dim=0)
    assert (zyx.max(0).values < torch.tensor(grid["shape"])).all()
    zyx = zyx[torch.randperm(zyx.shape[0], generator=torch.Generator().manual_seed(seed))]
    return torch.cat([torch.zeros_like(zyx[:, :1]), zyx], 1).int()


def features_for(indices: torch.Tensor, channels: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(indices.shape[0], channels, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kitti_sites(kitti_points) -> torch.Tensor:
    return active_sites(kitti_points, SECOND_GRID)


def make_layers(kind: str):
    """(layers, input channels): the layer kinds SparseEncoder / SparseUNet build."""
    torch.manual_seed(2)
    if kind == "subm":
        layers = [spconv.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="subm1")]
    elif kind == "strided":
        layers = [spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="spconv2")]
    elif kind == "conv_out":
        layers = [spconv.SparseConv3d(16, 32, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2")]
    elif kind == "inverse":  # SparseUNet decoder: inverse of the strided conv with the same key
        layers = [
            spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="spconv2"),
            spconv.SparseInverseConv3d(32, 16, 3, bias=False, indice_key="spconv2"),
        ]
    else:
        raise ValueError(kind)
    return torch.nn.ModuleList(layers).eval(), 16


def run(layers, features, indices, shape, batch_size=1, ours=False):
    """Run spconv's layers, or ours. spconv's CPU kernels are not deterministic with more than
    one thread (sums race: 1.8e-2 apart between two runs with 2 threads on the nuScenes grid),
    so the reference runs on one thread; ours is deterministic either way."""
    x = spconv.SparseConvTensor(features, indices, shape, batch_size)
    with torch.no_grad(), (contextlib.nullcontext() if ours else one_thread()):
        for layer in layers:
            x = sc.sparse_conv_forward(layer, x) if ours else layer(x)
    return x


def assert_same_sparse(ours, ref, atol=1e-4):
    assert ours.spatial_shape == ref.spatial_shape
    assert ours.indices.dtype == torch.int32
    # same output sites in the same order as spconv's CPU rulebook
    assert torch.equal(ours.indices, ref.indices)
    assert ours.features.shape == ref.features.shape
    torch.testing.assert_close(ours.features, ref.features, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind", ["subm", "strided", "conv_out", "inverse"])
def test_layer_equals_spconv_kitti_second_grid(kitti_sites, kind):
    layers, channels = make_layers(kind)
    feats = features_for(kitti_sites, channels)
    ref = run(layers, feats, kitti_sites, SECOND_GRID["shape"])
    ours = run(layers, feats, kitti_sites, SECOND_GRID["shape"], ours=True)
    assert_same_sparse(ours, ref)
    if kind in ("strided", "conv_out"):  # the sites really change
        assert ref.indices.shape[0] != kitti_sites.shape[0]
    if kind in ("subm", "inverse"):
        assert torch.equal(ours.indices, kitti_sites)
    # the rulebook is cached under its own key type, beside (not instead of) spconv's keys
    assert (sc.RULEBOOK_TAG, layers[0].indice_key) in ours.indice_dict


def test_layers_equal_spconv_nuscenes_batch2(nuscenes_points):
    """CenterPoint's grid, two samples in one batch, SubM (shared key) -> strided -> inverse."""
    a = active_sites(nuscenes_points, CENTERPOINT_GRID, seed=3)
    b = a[: a.shape[0] // 2].clone()
    b[:, 0] = 1
    indices = torch.cat([a, b])
    torch.manual_seed(4)
    layers = torch.nn.ModuleList(
        [
            spconv.SubMConv3d(5, 16, 3, padding=1, bias=False, indice_key="subm1"),
            spconv.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="subm1"),
            spconv.SparseConv3d(16, 32, 3, stride=2, padding=(0, 1, 1), bias=False, indice_key="spconv2"),
            spconv.SparseInverseConv3d(32, 8, 3, bias=False, indice_key="spconv2"),
        ]
    ).eval()
    feats = features_for(indices, 5, seed=5)
    for depth in (3, 4):  # strided output, then back on the input sites
        ref = run(layers[:depth], feats, indices, CENTERPOINT_GRID["shape"], batch_size=2)
        ours = run(layers[:depth], feats, indices, CENTERPOINT_GRID["shape"], batch_size=2, ours=True)
        assert_same_sparse(ours, ref)
    assert set(ours.indices[:, 0].tolist()) == {0, 1}


def test_kernel_weight_layouts():
    """[K, C_in, C_out] from spconv's KRSC and from the RSKC / RSCK layouts of other builds."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 3, 1, 2, 5, generator=g)  # KRSC: out=4, kernel (3,1,2), in=5
    k = sc.kernel_weight(w, [3, 1, 2], "KRSC")
    assert k.shape == (6, 5, 4)
    assert torch.equal(k[3], w[:, 1, 0, 1, :].T)  # offset (1,0,1) row-major = 1*2 + 1
    assert torch.equal(sc.kernel_weight(w.permute(1, 2, 3, 0, 4), [3, 1, 2], "RSKC"), k)
    assert torch.equal(sc.kernel_weight(w.permute(1, 2, 3, 4, 0), [3, 1, 2], "RSCK"), k)
    assert sc.weight_layout(spconv.SubMConv3d(2, 2, 3)) == "KRSC"


# CenterPoint voxel's SparseEncoder: SparseBasicBlocks, whose SubM convs have no indice_key
CENTERPOINT_ENCODER = dict(
    encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
    encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [0, 1, 1]), (0, 0)),
    block_type="basicblock",
)


@pytest.mark.parametrize("build", ["second", "centerpoint"])
def test_sparse_encoder_equals_spconv(kitti_sites, build):
    """mmdet3d's SparseEncoder as SECOND and CenterPoint voxel build it (on the KITTI grid),
    spconv vs our forward swapped in."""
    from mmdet3d.models.middle_encoders import SparseEncoder
    from spconv.pytorch.conv import SparseConvolution
    from spconv.pytorch.core import SparseConvTensor

    torch.manual_seed(7)
    extra = CENTERPOINT_ENCODER if build == "centerpoint" else {}
    encoder = SparseEncoder(in_channels=4, sparse_shape=SECOND_GRID["shape"], order=("conv", "norm", "act"), **extra).eval()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # non-trivial BN statistics
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                ranges = ((m.running_mean, -0.1, 0.1), (m.running_var, 0.5, 1.5), (m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1))
                for t, lo, hi in ranges:
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    feats = features_for(kitti_sites, 4, seed=9)
    with torch.no_grad(), one_thread():  # spconv's CPU kernels race with more threads
        ref = encoder(feats, kitti_sites, 1)
        saved = SparseConvolution.forward, SparseConvTensor.dense
        SparseConvolution.forward, SparseConvTensor.dense = sc.sparse_conv_forward, sc.dense_method
        try:
            ours = encoder(feats, kitti_sites, 1)
        finally:
            SparseConvolution.forward, SparseConvTensor.dense = saved
    assert SparseConvolution.forward is saved[0]
    assert ref.shape == ours.shape == (1, 256, 200, 176)
    assert (ref != 0).sum() > 10_000
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-3 * scale


def test_subm_layers_without_a_key_share_the_pairs_of_their_sites(kitti_sites):
    """SubM layers without an ``indice_key`` (mmdet3d's SparseBasicBlock convs) on one sites
    tensor build its pairs once (``sparse_conv._unnamed_subm_key``); the next sites tensor (after
    a strided layer) gets its own, and every output equals spconv's (which recomputes them)."""
    torch.manual_seed(10)
    layers = torch.nn.ModuleList(
        [
            spconv.SubMConv3d(16, 16, 3, padding=1, bias=False),
            spconv.SubMConv3d(16, 16, 3, padding=1, bias=False),
            spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="spconv2"),
            spconv.SubMConv3d(32, 32, 3, padding=1, bias=False),
            spconv.SubMConv3d(32, 32, 3, padding=1, bias=False),
            spconv.SubMConv3d(32, 32, (1, 3, 3), padding=(0, 1, 1), bias=False),
        ]
    ).eval()
    feats = features_for(kitti_sites, 16, seed=11)
    ref = run(layers, feats, kitti_sites, SECOND_GRID["shape"])
    ours = run(layers, feats, kitti_sites, SECOND_GRID["shape"], ours=True)
    assert_same_sparse(ours, ref)
    unnamed = [(k, r) for k, r in ours.indice_dict.items() if isinstance(k, tuple) and k[:2] == (sc.RULEBOOK_TAG, "unnamed subm")]
    # one for the input sites, two for the strided layer's: the 1x3x3 kernel has pairs of its own
    assert len(unnamed) == 3
    assert sum(r.in_indices is kitti_sites for _, r in unnamed) == 1
    assert sorted(tuple(r.ksize) for _, r in unnamed) == [(1, 3, 3), (3, 3, 3), (3, 3, 3)]


def test_to_dense_equals_spconv_dense(kitti_sites):
    coarse = torch.unique(kitti_sites[:, 1:] // torch.tensor([4, 8, 8], dtype=torch.int32), dim=0)
    indices = torch.cat([torch.cat([torch.zeros_like(coarse[:, :1]), coarse], 1),
                         torch.cat([torch.ones_like(coarse[:40, :1]), coarse[:40]], 1)]).int()
    one = indices[: coarse.shape[0]]
    for x in (spconv.SparseConvTensor(features_for(indices, 3), indices, [11, 200, 176], 2),
              spconv.SparseConvTensor(features_for(one, 3), one, [11, 200, 176], 1)):
        for channels_first in (True, False):
            ref = x.dense(channels_first)
            ours = sc.to_dense(x, channels_first)
            assert ours.shape == ref.shape
            assert torch.equal(ours, ref)
            assert ours.is_contiguous()


class _Layers(torch.nn.Module):
    """(features [N, C], indices [N, 4] int32) -> the last layer's (features, indices)."""

    def __init__(self, layers, shape):
        super().__init__()
        self.layers = layers
        self.shape = shape

    def forward(self, features, indices):
        x = spconv.SparseConvTensor(features, indices, self.shape, 1)
        for layer in self.layers:
            x = sc.sparse_conv_forward(layer, x)
        return x.features, x.indices


@pytest.mark.parametrize("kind", ["subm", "conv_out"])
def test_exports_with_dynamic_site_count(kitti_sites, tmp_path, kind):
    """PT2 and ONNX (onnxruntime) on two site counts; the strided layer's output count is an
    unbacked size in the graph."""
    layers, channels = make_layers(kind)
    feats = features_for(kitti_sites, channels)
    n_small = 7000
    inputs = [(feats, kitti_sites), (feats[:n_small].clone(), kitti_sites[:n_small].clone())]
    n = torch.export.Dim("num_sites", min=2)
    program = assert_exports(_Layers(layers, SECOND_GRID["shape"]), inputs, ({0: n}, {0: n}), tmp_path, atol=1e-4)
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("searchsorted" in t for t in targets)
    # static per-offset neighbour maps: no NonZero in a SubM graph, two in a strided one (the
    # candidate count and the output count), not one per kernel offset
    import onnx

    nodes = onnx.load(str(tmp_path / "op.onnx")).graph.node
    nonzero = sum(node.op_type == "NonZero" for node in nodes)
    assert nonzero == (0 if kind == "subm" else 2), nonzero
    # all offsets of the 16-channel layer in one GEMM (offset_groups)
    assert sum(node.op_type in ("MatMul", "Gemm") for node in nodes) == 1
    # the exported graph also agrees with spconv itself on the smaller input
    ref = run(layers, *inputs[1], SECOND_GRID["shape"])
    out_f, out_i = program.module()(*inputs[1])
    assert torch.equal(out_i, ref.indices)
    torch.testing.assert_close(out_f, ref.features, atol=1e-4, rtol=1e-5)


def test_offset_groups_split_the_kernel_evenly():
    assert sc.offset_groups(27, 16) == [(0, 27)]
    assert sc.offset_groups(27, 128) == [(0, 13), (13, 27)]  # at most 16 offsets of 128 channels
    assert sc.offset_groups(27, 4096) == [(k, k + 1) for k in range(27)]
    # the export sample's site count bounds a group's gathered bytes
    groups = sc.offset_groups(27, 16, sites=2_000_000)  # 128 MB an offset: 4 offsets a group
    assert len(groups) == 7 and all(e - s <= 4 for s, e in groups)
    assert groups[0][0] == 0 and groups[-1][1] == 27
    assert all(e == s for (_, e), (s, _) in zip(groups, groups[1:]))


def test_grouped_offsets_export_like_eager(kitti_sites, tmp_path, monkeypatch):
    """Several offset groups (a small reduction bound) give the same layer output as the eager
    per-offset loop, in PT2 and ONNX."""
    monkeypatch.setattr(sc, "SPARSE_GEMM_K", 64)  # 4 offsets of 16 channels a group: 7 groups
    layers, channels = make_layers("subm")
    feats = features_for(kitti_sites, channels)
    inputs = [(feats, kitti_sites), (feats[:5000].clone(), kitti_sites[:5000].clone())]
    n = torch.export.Dim("num_sites", min=2)
    assert_exports(_Layers(layers, SECOND_GRID["shape"]), inputs, ({0: n}, {0: n}), tmp_path, atol=1e-4)
    import onnx

    nodes = onnx.load(str(tmp_path / "op.onnx")).graph.node
    assert sum(node.op_type in ("MatMul", "Gemm") for node in nodes) == 7


@pytest.mark.parametrize("kind", ["subm", "strided", "inverse"])
def test_layers_compile_in_iree_and_equal_spconv(kitti_sites, tmp_path, kind):
    """The IREE form (``export_forms(iree=True)``: the rulebooks' sorts as radix sorts, which IREE
    runs in linear time) compiles with the ``host`` preset, and the vmfb gives spconv's sites and
    features on two site counts."""
    import onnx

    from codegen.iree import compile_onnx, iree_runtime
    from codegen.ops.points import export_forms

    layers, channels = make_layers(kind)
    feats = features_for(kitti_sites, channels)
    n = torch.export.Dim("num_sites", min=2)
    with torch.no_grad(), export_forms(iree=True):
        program = torch.export.export(
            _Layers(layers, SECOND_GRID["shape"]), (feats, kitti_sites), dynamic_shapes=({0: n}, {0: n}), strict=False
        )
    path = tmp_path / "op.onnx"
    torch.onnx.export(program, (), str(path), dynamo=True, opset_version=18, external_data=False)
    assert "TopK" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    compile_onnx(path, tmp_path / "op.vmfb")
    runtime = iree_runtime(tmp_path / "op.vmfb", ["features", "indices"], static={})
    for count in (kitti_sites.shape[0], 5000):
        args = feats[:count].contiguous(), kitti_sites[:count].contiguous()
        ref = run(layers, *args, SECOND_GRID["shape"])
        out_f, out_i = (np.asarray(o) for o in runtime.run(tuple(a.numpy() for a in args)))
        np.testing.assert_array_equal(out_i, ref.indices.numpy())
        np.testing.assert_allclose(out_f, ref.features.numpy(), atol=1e-4, rtol=1e-5)
