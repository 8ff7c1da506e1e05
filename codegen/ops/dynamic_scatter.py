"""Pure-torch ``DynamicScatter`` (point -> voxel reduction) equal to mmcv, traceable by torch.export.

Public API
----------
``dynamic_scatter(feats, coors, reduce='max', max_impl='sort') -> (voxel_feats [M, C], voxel_coors [M, D])``
    Equal to ``mmcv.ops.dynamic_scatter(feats, coors, reduce)`` for ``reduce`` in
    ``'max' | 'sum' | 'mean'`` and ``coors`` ``[N, D]`` integer (``D`` = 3 for ``(z, y, x)``, 4 for
    ``(batch, z, y, x)``): voxels are the distinct coordinate rows sorted lexicographically
    ascending (``unique(dim=0, sorted=True)``), rows with any negative entry are ignored.  ``M`` is
    data dependent (an unbacked SymInt under torch.export); exports to PT2 and ONNX.

``dynamic_scatter_padded(feats, coors, reduce='max', max_impl='sort', grid=None, groups=None)
-> (voxel_feats [N, C], voxel_coors [N, D], point2voxel [N] int64, num_voxels [] int64)``
    Fixed-shape form (rows padded to ``N``, the number of points, with zeros; ``point2voxel`` is
    each point's output row or ``-1``, like mmcv's internal ``coors_map``).  Output shapes depend
    only on ``N``: this is the form for IREE.

``group_points(coors, grid=None, reduce='mean', max_impl='scatter') -> Groups``
    The grouping ``dynamic_scatter_padded`` computes, to pass to several of its calls over the same
    coors (``groups=``): DynamicVFE's cluster mean and max then group the points once.

``DynamicScatter(voxel_size, point_cloud_range, average_points, max_impl='sort')``
    ``nn.Module`` with the constructor and ``forward(points, coors)`` of
    ``mmcv.ops.DynamicScatter`` so a patch can swap it in.  Four-column coors are reduced in one
    pass: lexicographic order with the batch id first equals mmcv's per-sample loop (which assumes
    batch-sorted coors, ``batch_size = coors[-1, 0] + 1``), without the data-dependent loop.

mmcv 2.1.0 has no CPU kernel for ``dynamic_point_to_voxel_forward``; these semantics are those of
its CUDA launcher (``scatter_points_cuda.cu``: ``unique_dim`` on coors with invalid rows set to -1,
first row dropped, sum / count for mean, ``-inf``-initialised max).  The tests compare against a
readable Python reference of exactly that.

How (no Unique, no NonZero, no Python loops over data)
------------------------------------------------------
Coordinates are packed into one int64 key (row-major over the per-column extents ``max + 1``,
invalid rows -> the sentinel ``prod(extents)``), sorted once (``TopK``), group starts found by
comparing each key with its predecessor and numbered with ``CumSum``; a permutation scatter
(``ScatterND``) maps the group ids back to input order.  Reductions:

* ``sum`` / ``mean``: ``scatter_add`` -> ``ScatterElements(reduction='add')``, accumulated in
  input order (eager CPU and onnxruntime alike); mean divides by the group size taken from the
  group starts.  Not ``index_put(accumulate=True)``: it exports to ``ScatterND(reduction='add')``,
  whose onnxruntime CPU kernel gave run-to-run different (sometimes grossly wrong) sums here: a
  thread race, microsoft/onnxruntime#18048 / #23396.
* ``max`` with ``max_impl='sort'`` (default): no max-scatter.  Each feature channel is sorted
  by value (``TopK`` on ``[C, N]``), then by the unique int64 key ``group * N + value_position``;
  every group then occupies the same contiguous range in every channel with its maximum last,
  read with ``GatherElements``.  Two ``[C, N]`` sorts, O(N C log N): ~0.3 s eager for the
  nuScenes frame with C = 69 (34688 points) on one CPU thread.  Compiles with IREE 3.13.
* ``max`` with ``max_impl='scatter'`` (what the dynamic-voxel patches use): ``scatter_reduce('amax')``
  -> ``ScatterElements(reduction='max')`` (opset 18), O(N C), ~10 ms for the same input.
  IREE 3.13 cannot legalize a max-reducing ScatterElements, so IREE's copy of the graph gets
  the equal ``ScatterND(reduction='max')`` over the row indices
  (``graph_forms.row_max_scatters_as_scatter_nd``), which it compiles; onnxruntime keeps the
  ScatterElements (its reducing ScatterND races). PointPillars-DV, onnxruntime, one thread:
  456 ms per frame against 574 with the sorts (their TopK took 109 ms); IREE: 0.67 s per frame
  (two threads) against ~80 s with the sorts, which IREE lowers to an O(n^2) loop.

**Counting instead of sorting** (``grid`` given, at most ``DENSE_MAX_CELLS`` cells, max by
scatter): the occupied cells of the grid are marked (a non-reducing ``ScatterND`` of ones) and
numbered by a ``CumSum`` in row-major order, which is the sorted keys' order; a point's voxel is
its cell's number. No ``TopK`` is left in the graph. The dynamic-voxel patches pass the voxel
layer's grid (with the static batch size as the first axis): PointPillars' 432 x 496 pillars take
this form, SECOND's 1408 x 1600 x 41 voxels keep the sort. Same outputs as the sort form
(tests/ops/test_dynamic_scatter.py).

Both forms with ``max_impl='sort'`` (and sum / mean) were also compiled with IREE 3.13 (llvm-cpu)
from the exported ONNX and matched eager bit for bit on the KITTI and nuScenes frames (checked by
hand, not in the tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .forms import iree_exporting
from .sort import sort_keys
from .voxelize import _iota

__all__ = ["dynamic_scatter", "dynamic_scatter_padded", "DynamicScatter", "Groups", "grid_of", "group_points"]

_REDUCE = ("max", "sum", "mean")


def _row_major(c: Tensor, extent) -> Tensor:
    """One int64 key per row of ``c`` ``[N, D]``: row-major over the per-column ``extent``."""
    lin = torch.zeros_like(c[:, 0])
    for j in range(c.shape[1]):  # static: D columns
        lin = lin * extent[j] + c[:, j]
    return lin


def _group(coors: Tensor, grid: Sequence[int] | None = None):
    """Sort the packed voxel keys; returns (perm, is_start, group [sorted], valid_sorted, valid,
    order, starts [N + 1]).

    Keys are row-major over the coors' data-dependent extents, or, in IREE exports with the
    ``grid`` known, over the grid (a static bound, so a radix sort: ``codegen.ops.sort``; rows
    outside the grid are invalid, as in ``_group_dense``).  Same groups in the same order."""
    n = coors.shape[0]
    valid = (coors >= 0).all(dim=1)
    on_grid = grid is not None and iree_exporting()
    if on_grid:
        limit = torch.tensor(list(grid), dtype=coors.dtype, device=coors.device)
        valid = valid & (coors < limit).all(dim=1)
    c = torch.where(valid[:, None], coors, torch.zeros_like(coors)).to(torch.int64)
    # [D] extents: the grid's, or data-dependent ones kept as a tensor
    extent = grid if on_grid else c.amax(dim=0) + 1
    sentinel = math.prod(grid) if on_grid else torch.prod(extent)
    lin = torch.where(valid, _row_major(c, extent), sentinel)
    # only group membership matters: no stability needed
    slin, perm = sort_keys(lin, sentinel + 1) if on_grid else torch.sort(lin)
    order = _iota(lin)
    is_start = (slin != slin[(order - 1).clamp(min=0)]) | (order == 0)
    group = torch.cumsum(is_start.to(torch.int64), 0) - 1
    # start position of every group in sorted order, N for the groups after the last one
    starts = torch.zeros(n + 1, dtype=torch.int64, device=coors.device)
    beyond = _iota(starts) > group[-1:]
    starts = starts.index_put_((torch.where(is_start, group, torch.full_like(group, n)),), order)
    starts = torch.where(beyond, torch.full_like(starts, n), starts)
    return perm, is_start, group, slin < sentinel, valid, order, starts


def _segment_max_sort(feats: Tensor, group_sorted: Tensor, perm: Tensor, order: Tensor, starts: Tensor):
    """Per-group column max via two sorts (no max-scatter). Returns [N, C] rows by group id
    (rows beyond the number of groups are garbage; the caller masks them)."""
    n, ch = feats.shape
    # group id of every input point (perm is a permutation: plain scatter)
    gid = torch.zeros(n, dtype=torch.int64, device=feats.device).index_put_((perm,), group_sorted)
    # channels-first so both sorts run along the contiguous last axis
    vals, by_value = torch.sort(feats.t().contiguous(), dim=1)  # [C, N], each row ascending
    # unique key per channel: (group, position in value order); its sorted values carry everything
    # needed (position = key - group * N), so the indices of this sort are unused
    skey, _ = torch.sort(gid[by_value] * n + order[None, :], dim=1)
    # groups are contiguous with identical ranges in every channel: group g ends just before the
    # start of group g + 1
    last = starts[order + 1] - 1  # last sorted position of group g (absent groups: N - 1)
    pos = torch.gather(skey, 1, last[None, :].expand(ch, n)) - order[None, :] * n
    return torch.gather(vals, 1, pos.clamp(min=0, max=n - 1)).t().contiguous()


# largest grid (cells, batch included) grouped by counting instead of sorting: an int64
# occupancy of 4M cells is 32 MiB
DENSE_MAX_CELLS = 1 << 22


def grid_of(voxel_size: Sequence[float], point_cloud_range: Sequence[float], batch_size: int | None = None) -> list[int]:
    """Per-column extents of mmcv's voxel coors ``(batch,) z, y, x``: the grid size mmcv's
    voxelization computes, ``round((max - min) / voxel_size)`` per axis."""
    size = [round((point_cloud_range[i + 3] - point_cloud_range[i]) / voxel_size[i]) for i in range(3)]
    return ([batch_size] if batch_size is not None else []) + size[::-1]


def _group_dense(coors: Tensor, grid: Sequence[int]):
    """Sort-free grouping over a bounded grid: returns (point2voxel [N] (-1: invalid), num_voxels
    [], voxel_coors [N, D]). Voxel ids are the ranks of the occupied cells in row-major order,
    i.e. the sort form's lexicographic order."""
    n = coors.shape[0]
    c = coors.to(torch.int64)
    # rows outside the grid would alias other cells: treated as invalid (mmcv's voxelization
    # marks them -1 already with this grid)
    valid = ((c >= 0) & (c < torch.tensor(list(grid), dtype=torch.int64, device=coors.device))).all(dim=1)
    cells = math.prod(grid)
    lin = torch.where(valid, _row_major(torch.where(valid[:, None], c, torch.zeros_like(c)), grid), torch.full_like(c[:, 0], cells))
    occupied = torch.zeros(cells + 1, dtype=torch.int64, device=coors.device).index_put((lin,), torch.ones_like(lin))[:cells]
    counted = torch.cumsum(occupied, 0)
    group = (counted - 1).index_select(0, lin.clamp(max=cells - 1))
    point2voxel = torch.where(valid, group, torch.full_like(group, -1))
    voxel_coors = torch.zeros(n + 1, coors.shape[1], dtype=coors.dtype, device=coors.device)
    # a voxel's points all write the same row
    voxel_coors = voxel_coors.index_put((torch.where(valid, group, torch.full_like(group, n)),), coors)[:n]
    # the count's last element is the number of occupied cells (no second pass over the grid)
    return point2voxel, counted[-1], voxel_coors


class Groups(NamedTuple):
    """The voxels of a set of points (``group_points``): each point's voxel row (``-1``:
    invalid coors), the number of voxels (0-d int64), the voxels' coors ``[N, D]`` (padding rows
    zero) and, when grouped by sorting, ``(perm, group, starts)`` of the sorted keys (what the
    sorted max and the mean read); ``None`` when grouped by counting."""

    point2voxel: Tensor
    num_voxels: Tensor
    voxel_coors: Tensor
    sorted: tuple[Tensor, Tensor, Tensor] | None


def _by_counting(grid: Sequence[int] | None, reduce: str, max_impl: str) -> bool:
    """Whether points are grouped by counting over ``grid`` (see ``dynamic_scatter_padded``)."""
    return grid is not None and math.prod(grid) <= DENSE_MAX_CELLS and (reduce != "max" or max_impl == "scatter")


def group_points(coors: Tensor, grid: Sequence[int] | None = None, reduce: str = "mean", max_impl: str = "scatter") -> Groups:
    """The voxels of the points with ``coors`` ``[N, D]`` (``N`` >= 1) as ``dynamic_scatter_padded``
    groups them for ``reduce`` / ``max_impl``: by counting over a small ``grid``, else by sorting
    the keys. Several scatters over the same coors (DynamicVFE's cluster mean and its max) can
    share one grouping."""
    if _by_counting(grid, reduce, max_impl):
        return Groups(*_group_dense(coors, grid), None)
    n = coors.shape[0]
    perm, is_start, group, valid_s, valid, _, starts = _group(coors, grid)
    num_voxels = (is_start & valid_s).sum()
    point2voxel = torch.zeros(n, dtype=torch.int64, device=coors.device).index_put_((perm,), group)
    point2voxel = torch.where(valid, point2voxel, torch.full_like(point2voxel, -1))
    voxel_coors = torch.zeros(n + 1, coors.shape[1], dtype=coors.dtype, device=coors.device)
    voxel_coors = voxel_coors.index_put_((torch.where(is_start & valid_s, group, torch.full_like(group, n)),), coors[perm])[:n]
    return Groups(point2voxel, num_voxels, voxel_coors, (perm, group, starts))


def dynamic_scatter_padded(
    feats: Tensor,
    coors: Tensor,
    reduce: str = "max",
    max_impl: str = "sort",
    grid: Sequence[int] | None = None,
    groups: Groups | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmcv ``dynamic_scatter`` with outputs padded to ``N`` rows (zeros) plus ``point2voxel``
    (output row of each point, ``-1`` if its coors are invalid) and ``num_voxels`` (0-d int64).

    ``grid``: the coors columns' extents (``grid_of``). With at most ``DENSE_MAX_CELLS`` cells and
    no sorted max, points are grouped by counting over the grid instead of sorting their keys
    (IREE lowers sorts to O(n^2) loops); on larger grids IREE exports sort the keys with a radix
    sort (``codegen.ops.forms``; bound: the grid).  The outputs are the same.

    ``groups``: a ``group_points`` of the same ``coors`` to reuse (a sorted max needs a sorted
    grouping; given a counted one, it sorts its own)."""
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    if max_impl not in ("scatter", "sort"):
        raise ValueError(f"max_impl must be 'scatter' or 'sort', got {max_impl!r}")
    n, ch = feats.shape
    if n == 0:  # like mmcv; statically false for an exported (>= 2) dynamic size
        return (
            feats.clone(),
            coors.clone(),
            coors.new_zeros(0, dtype=torch.int64),
            coors.new_zeros((), dtype=torch.int64),
        )
    sorted_max = reduce == "max" and max_impl == "sort"
    if groups is None or (sorted_max and groups.sorted is None):
        groups = group_points(coors, grid, reduce, max_impl)
    point2voxel, num_voxels, voxel_coors = groups.point2voxel, groups.num_voxels, groups.voxel_coors
    perm, group, starts = groups.sorted or (None, None, None)
    target = torch.where(point2voxel >= 0, point2voxel, torch.full_like(point2voxel, n))  # invalid -> dump row

    if reduce == "max":
        if max_impl == "sort":
            order = _iota(coors[:, 0])
            out = _segment_max_sort(feats, group, perm, order, starts)
            out = torch.where((order < num_voxels)[:, None], out, torch.zeros_like(out))
        else:
            # rows 0 .. M-1 (each has a point) start at -inf, the padding rows (no point; the
            # dump row N takes the invalid ones) at 0, their output: the mask is applied to an
            # [N + 1, 1] column instead of the [N, C] result (onnxruntime, PointPillars-DV's
            # 16897 x 64, two threads: a 2.5 ms Where); zeros plus the column, which onnxruntime
            # broadcasts faster than an Expand of it (0.6 against 0.85 ms)
            is_voxel = (_iota(target.new_empty(n + 1)) < num_voxels)[:, None]
            init = feats.new_zeros(n + 1, ch) + torch.where(is_voxel, float("-inf"), 0.0).to(feats.dtype)
            out = init.scatter_reduce(0, target[:, None].expand(n, ch), feats, "amax", include_self=True)[:n]
    else:
        # ScatterElements(reduction='add'), sequential in input order in eager and onnxruntime
        # (ScatterND(reduction='add'), what index_put(accumulate=True) exports to, races in
        # onnxruntime: microsoft/onnxruntime#23396)
        out = feats.new_zeros(n + 1, ch).scatter_add_(0, target[:, None].expand(n, ch), feats)[:n]
        if reduce == "mean":  # points per group; 0 beyond the last group
            if starts is None:
                count = torch.zeros(n + 1, dtype=torch.int64, device=coors.device).scatter_add_(0, target, torch.ones_like(target))[:n]
            else:
                count = starts[_iota(coors[:, 0]) + 1] - starts[:n]
            out = out / count.clamp(min=1).to(out.dtype)[:, None]
    return out, voxel_coors, point2voxel, num_voxels


def dynamic_scatter(
    feats: Tensor, coors: Tensor, reduce: str = "max", max_impl: str = "sort", grid: Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Equal to ``mmcv.ops.dynamic_scatter(feats, coors, reduce)``: ``voxel_feats [M, C]``,
    ``voxel_coors [M, D]`` (coors dtype) for the ``M`` distinct valid coordinate rows in
    lexicographic order (``M`` is an unbacked SymInt under torch.export)."""
    out, voxel_coors, _, num_voxels = dynamic_scatter_padded(feats, coors, reduce, max_impl, grid)
    m = num_voxels.item()
    torch._check(m >= 0)
    torch._check(m <= feats.shape[0])
    return out[:m], voxel_coors[:m]


class DynamicScatter(nn.Module):
    """Drop-in for ``mmcv.ops.DynamicScatter`` (same constructor, ``forward(points, coors)``):
    ``'mean'`` if ``average_points`` else ``'max'``.  ``max_impl`` selects the max lowering
    (see the module docstring)."""

    def __init__(
        self,
        voxel_size: Sequence[float],
        point_cloud_range: Sequence[float],
        average_points: bool,
        max_impl: str = "sort",
    ):
        super().__init__()
        self.voxel_size = voxel_size
        self.point_cloud_range = point_cloud_range
        self.average_points = average_points
        self.max_impl = max_impl

    def forward_single(self, points: Tensor, coors: Tensor) -> tuple[Tensor, Tensor]:
        reduce = "mean" if self.average_points else "max"
        return dynamic_scatter(points, coors, reduce, self.max_impl)

    def forward(self, points: Tensor, coors: Tensor) -> tuple[Tensor, Tensor]:
        # 3 or 4 columns alike: with the batch id as the leading column, one lexicographic pass
        # equals mmcv's per-sample loop + concatenation
        return self.forward_single(points, coors)

    def extra_repr(self) -> str:
        return (
            f"voxel_size={self.voxel_size}, point_cloud_range={self.point_cloud_range}, "
            f"average_points={self.average_points}, max_impl={self.max_impl}"
        )
