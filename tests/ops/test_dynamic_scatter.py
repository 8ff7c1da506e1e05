"""Pure-torch DynamicScatter (codegen/ops/dynamic_scatter.py) on real frames, and each form
exported alone (PT2 reloaded + onnxruntime vs eager at two point counts).

mmcv 2.1.0 has no CPU kernel for ``dynamic_point_to_voxel_forward`` (``mmcv.ops.dynamic_scatter``
raises "implementation for device cpu not found"; asserted below), so the reference is a plain
Python loop over the unique voxels that follows mmcv's CUDA launcher: rows with a negative
coordinate are dropped, voxels come out in ``unique(dim=0, sorted=True)`` order, max / sum /
sum-divided-by-count per voxel.  The voxel coordinates themselves come from mmcv's own
``dynamic_voxelize`` CPU kernel.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from export_check import assert_exports
from mmcv.ops.voxelize import voxelization as mmcv_voxelization

from codegen.ops.dynamic_scatter import DENSE_MAX_CELLS, DynamicScatter, dynamic_scatter, dynamic_scatter_padded, grid_of, group_points

# PointPillars KITTI and CenterPoint nuScenes (0.1 m) voxel configs
KITTI = dict(voxel_size=[0.16, 0.16, 4], coors_range=[0, -39.68, -3, 69.12, 39.68, 1])
NUS = dict(voxel_size=[0.1, 0.1, 0.2], coors_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0])
WIDE = 64  # extra feature channels, like the 64-channel point features a DynamicVFE scatters


def reference_scatter(feats: torch.Tensor, coors: torch.Tensor, reduce: str):
    """Readable reference: group point indices by voxel, visit voxels in sorted order, reduce.
    Sums accumulate in float32 in input order."""
    f, c = feats.numpy(), coors.numpy()
    members: dict[tuple, list[int]] = {}
    for i, row in enumerate(map(tuple, c.tolist())):
        if min(row) >= 0:
            members.setdefault(row, []).append(i)
    keys = sorted(members)
    out = np.zeros((len(keys), f.shape[1]), np.float32)
    for v, key in enumerate(keys):
        rows = f[members[key]]
        if reduce == "max":
            out[v] = rows.max(axis=0)
        else:
            acc = np.zeros(f.shape[1], np.float32)
            for r in rows:
                acc += r
            out[v] = acc / np.float32(len(rows)) if reduce == "mean" else acc
    return torch.from_numpy(out), torch.tensor(keys, dtype=coors.dtype).reshape(-1, c.shape[1])


def _features(points: np.ndarray) -> torch.Tensor:
    """Real point features plus a fixed random projection of them (wider, signed channels)."""
    pts = torch.from_numpy(points)
    w = torch.randn(pts.shape[1], WIDE, generator=torch.Generator().manual_seed(0))
    return torch.cat([pts, pts @ w], dim=1).contiguous()


_CACHE: dict = {}


def _case(request, name: str):
    """(feats, coors from mmcv's dynamic voxelization) for a real frame, cached per module."""
    if name not in _CACHE:
        points = request.getfixturevalue("kitti_points" if name == "kitti" else "nuscenes_points")
        cfg = KITTI if name == "kitti" else NUS
        pts = torch.from_numpy(points)
        coors = mmcv_voxelization(pts, cfg["voxel_size"], cfg["coors_range"], -1, -1)
        _CACHE[name] = (_features(points), coors)
    return _CACHE[name]


def _reference(request, name: str, reduce: str):
    key = (name, reduce)
    if key not in _CACHE:
        _CACHE[key] = reference_scatter(*_case(request, name), reduce)
    return _CACHE[key]


def _check(out, ref, reduce):
    (feats, coors), (ref_feats, ref_coors) = out, ref
    assert coors.dtype == ref_coors.dtype and torch.equal(coors, ref_coors)
    assert feats.shape == ref_feats.shape and feats.dtype == ref_feats.dtype
    if reduce == "max":
        assert torch.equal(feats, ref_feats)
    else:
        np.testing.assert_allclose(feats.numpy(), ref_feats.numpy(), rtol=1e-6, atol=1e-6)


def test_mmcv_has_no_cpu_kernel():
    from mmcv.ops import dynamic_scatter as mmcv_dynamic_scatter

    with pytest.raises(RuntimeError, match="cpu"):
        mmcv_dynamic_scatter(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32), "max")


@pytest.mark.parametrize("name", ["kitti", "nus"])
@pytest.mark.parametrize("reduce,max_impl", [("max", "sort"), ("max", "scatter"), ("mean", "sort"), ("sum", "sort")])
def test_dynamic_scatter_matches_reference(request, name, reduce, max_impl):
    feats, coors = _case(request, name)
    ref = _reference(request, name, reduce)
    assert len(ref[0]) > 3000 and (coors < 0).any()  # many voxels, and out-of-range points to skip
    _check(dynamic_scatter(feats, coors, reduce, max_impl), ref, reduce)
    # padded form: same rows first, zeros after, point2voxel points at the voxel of each point
    out, vcoors, p2v, num = dynamic_scatter_padded(feats, coors, reduce, max_impl)
    m = int(num)
    assert m == len(ref[0]) and out.shape[0] == vcoors.shape[0] == len(feats)
    _check((out[:m], vcoors[:m]), ref, reduce)
    assert not out[m:].any() and not vcoors[m:].any()
    valid = (coors >= 0).all(1)
    assert bool((p2v[~valid] == -1).all()) and torch.equal(vcoors[p2v[valid]], coors[valid])


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_grouping_by_counting_over_the_grid_matches_reference(request, reduce):
    """With the grid given (PointPillars' 432 x 496 x 1 pillars), the points are grouped by
    counting occupied cells instead of sorting their keys (no TopK in the graph: IREE sorts in
    O(n^2)); the outputs are the sort form's, in mmcv's order."""
    feats, coors = _case(request, "kitti")
    grid = grid_of(KITTI["voxel_size"], KITTI["coors_range"])
    assert grid == [1, 496, 432]
    ref = _reference(request, "kitti", reduce)
    _check(dynamic_scatter(feats, coors, reduce, "scatter", grid), ref, reduce)
    dense = dynamic_scatter_padded(feats, coors, reduce, "scatter", grid)
    sort = dynamic_scatter_padded(feats, coors, reduce, "scatter")
    for a, b in zip(dense, sort):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # batched four-column coors: the batch is the leading grid axis
    coors2 = torch.cat([torch.nn.functional.pad(coors, (1, 0), value=b) for b in (0, 1)])
    feats2 = torch.cat([feats, feats.flip(0)])
    dense = dynamic_scatter_padded(feats2, coors2, reduce, "scatter", grid_of(KITTI["voxel_size"], KITTI["coors_range"], 2))
    sort = dynamic_scatter_padded(feats2, coors2, reduce, "scatter")
    for a, b in zip(dense, sort):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grid", [True, False], ids=["counted", "sorted"])
def test_shared_grouping_gives_the_same_scatters(request, grid):
    """One ``group_points`` reused by a mean and a max over the same coors (what the dynamic
    encoders do) gives each scatter's own outputs; a sorted max handed a counted grouping sorts
    its own."""
    feats, coors = _case(request, "kitti")
    grid = grid_of(KITTI["voxel_size"], KITTI["coors_range"]) if grid else None
    shared = group_points(coors, grid)
    assert (shared.sorted is None) == (grid is not None)
    for reduce, max_impl in (("mean", "scatter"), ("max", "scatter"), ("max", "sort"), ("sum", "scatter")):
        alone = dynamic_scatter_padded(feats, coors, reduce, max_impl, grid)
        reused = dynamic_scatter_padded(feats, coors, reduce, max_impl, grid, shared)
        for a, b in zip(alone, reused):
            assert a.dtype == b.dtype and torch.equal(a, b), (reduce, max_impl)


def test_counting_form_exports_without_sorts(request, tmp_path):
    feats, coors = _case(request, "kitti")
    n = torch.export.Dim("num_points", min=2)
    half = (feats[::2].contiguous(), coors[::2].contiguous())
    grid = grid_of(KITTI["voxel_size"], KITTI["coors_range"])
    op = _Op(lambda f, c, r, m: dynamic_scatter_padded(f, c, r, m, grid), "max", "scatter")
    assert_exports(op, [(feats, coors), half], ({0: n}, {0: n}), tmp_path)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "op.onnx")).graph.node}
    assert "TopK" not in ops and "CumSum" in ops


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_large_grid_radix_form_exports_without_topk(request, tmp_path, reduce):
    """CenterPoint's 0.1 m nuScenes grid (42M cells: no counting) in an IREE export: the keys
    over the static grid, radix-sorted; same voxels and features as the reference."""
    from codegen.ops.forms import iree_forms

    feats, coors = _case(request, "nus")
    grid = grid_of(NUS["voxel_size"], NUS["coors_range"])
    assert math.prod(grid) > DENSE_MAX_CELLS
    n = torch.export.Dim("num_points", min=2)
    half = (feats[::2].contiguous(), coors[::2].contiguous())
    op = _Op(lambda f, c, r, m: dynamic_scatter(f, c, r, m, grid), reduce, "scatter")
    with iree_forms():
        assert_exports(op, [(feats, coors), half], ({0: n}, {0: n}), tmp_path, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "op.onnx")).graph.node}
    assert "TopK" not in ops and "CumSum" in ops


def test_module_batched_like_mmcv_loop(request):
    """4-column coors (batch, z, y, x): one pass equals mmcv's per-sample loop + concatenation."""
    kitti_feats, kitti_coors = _case(request, "kitti")
    nus_feats, nus_coors = _case(request, "nus")
    feats = torch.cat([kitti_feats[:, :WIDE], nus_feats[:, :WIDE]])
    batches = [kitti_coors, nus_coors]
    coors = torch.cat([torch.nn.functional.pad(c, (1, 0), value=b) for b, c in enumerate(batches)])
    for average in (False, True):
        reduce = "mean" if average else "max"
        module = DynamicScatter(NUS["voxel_size"], NUS["coors_range"], average)
        start, ref_feats, ref_coors = 0, [], []
        for b, c in enumerate(batches):  # mmcv DynamicScatter.forward, with the reference kernel
            f, vc = reference_scatter(feats[start : start + len(c)], c, reduce)
            ref_feats.append(f)
            ref_coors.append(torch.nn.functional.pad(vc, (1, 0), value=b))
            start += len(c)
        ref = torch.cat(ref_feats), torch.cat(ref_coors)
        assert int((ref[1][:, 0] == 1).sum()) > 0 and int((ref[1][:, 0] == 0).sum()) > 0
        _check(module(feats, coors), ref, reduce)


class _Op(torch.nn.Module):
    def __init__(self, fn, reduce, max_impl):
        super().__init__()
        self.fn, self.reduce, self.max_impl = fn, reduce, max_impl

    def forward(self, feats, coors):
        return self.fn(feats, coors, self.reduce, self.max_impl)


@pytest.mark.parametrize(
    "form,reduce,max_impl",
    [("padded", "max", "sort"), ("padded", "max", "scatter"), ("padded", "mean", "sort"), ("dynamic", "max", "sort"), ("dynamic", "max", "scatter")],
)
def test_dynamic_scatter_exports(request, tmp_path, form, reduce, max_impl):
    feats, coors = _case(request, "kitti")
    feats = feats[:, :16].contiguous()  # the graph does not depend on C; keeps the eager sorts short
    n = torch.export.Dim("num_points", min=2)
    half = (feats[::2].contiguous(), coors[::2].contiguous())
    fn = dynamic_scatter_padded if form == "padded" else dynamic_scatter
    assert_exports(_Op(fn, reduce, max_impl), [(feats, coors), half], ({0: n}, {0: n}), tmp_path)
    nodes = onnx.load(str(tmp_path / "op.onnx")).graph.node
    ops = {node.op_type for node in nodes}
    assert not ops & {"Unique", "NonZero", "Compress"}
    # no reducing ScatterND: onnxruntime's kernel races (microsoft/onnxruntime#23396)
    assert not [n for n in nodes if n.op_type == "ScatterND" and any(a.name == "reduction" for a in n.attribute)]
    max_scatters = [
        node for node in nodes if node.op_type == "ScatterElements" and any(a.s == b"max" for a in node.attribute)
    ]
    assert bool(max_scatters) == (reduce == "max" and max_impl == "scatter")
