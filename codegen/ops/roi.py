"""Pure-torch points-in-boxes, ``RoIAwarePool3d`` and ``RoIPointPool3d`` equal to mmcv, traceable by
torch.export.

Public API
----------
``points_in_boxes_all(points [B, N, 3], boxes [B, M, 7]) -> [B, N, M] int32``
    1 where point ``n`` is inside box ``m``, else 0.  Equal to ``mmcv.ops.points_in_boxes_all``
    (CUDA only) and ``mmcv.ops.points_in_boxes_cpu`` (CPU kernel; same output layout).
    ``points_in_boxes_cpu`` is an alias.

``points_in_boxes_part(points [B, N, 3], boxes [B, M, 7]) -> [B, N] int32``
    Index of the *first* box (lowest index) containing each point, ``-1`` for none.  Equal to
    ``mmcv.ops.points_in_boxes_part`` (CUDA only: its kernel loops over boxes and breaks at the
    first hit).

``roiaware_pool3d(rois [M, 7], pts [N, 3], pts_feature [N, C], out_size, max_pts_per_voxel=128,
mode='max', compact=True) -> [M, out_x, out_y, out_z, C]`` and the module
``RoIAwarePool3d(out_size, max_pts_per_voxel=128, mode='max', compact=True)`` (mmcv's constructor
and ``forward(rois, pts, pts_feature)``).  Equal to ``mmcv.ops.RoIAwarePool3d`` (CUDA only).

``roipoint_pool3d(points [B, N, 3], point_features [B, N, C], boxes3d [B, M, 7], num_sampled_points=512)
-> (pooled_features [B, M, num, 3 + C], pooled_empty_flag [B, M] int32)`` and the module
``RoIPointPool3d(num_sampled_points=512)``.  Equal to ``mmcv.ops.RoIPointPool3d`` (CUDA only).

Boxes are mmdet3d LiDAR/Depth boxes ``(x, y, z, x_size, y_size, z_size, yaw)`` with ``(x, y, z)`` the
bottom centre.

Inside test, reproduced bit for bit (mmcv ``points_in_boxes.cpp`` / the ``check_pt_in_box3d`` of the
CUDA kernels, all three ops use the same test)
---------------------------------------------------------------------------------------------------
``cz_c = float(double(cz) + double(z_size) / 2)``; the point is inside iff
``|z - cz_c| <= z_size / 2`` and, with ``(sx, sy) = (x - cx, y - cy)`` (float32),
``cosa = float(cos(double(-yaw)))``, ``sina = float(sin(double(-yaw)))``,
``local_x = sx * cosa - sy * sina``, ``local_y = sx * sina + sy * cosa`` (float32, no FMA),
``-x_size/2 < local_x < x_size/2`` and ``-y_size/2 < local_y < y_size/2`` (strict; evaluated as
``|local_x| < x_size/2``, the same predicate).  The sine and
cosine are evaluated in float64 and rounded to float32 because mmcv's CPU build calls the double
``sincos`` on the widened float angle (seen in the disassembly of ``points_in_boxes_cpu_forward``);
mmcv's CUDA kernels use float ``cosf``/``sinf`` and can differ from the CPU kernel in the last ulp of
``cosa``, i.e. for points within ~1e-7 relative of a box face.  (IREE demotes f64 to f32 by
default; then the same caveat applies to an IREE build.)

RoIAwarePool3d semantics (``roiaware_pool3d_cuda_kernel.cuh``)
--------------------------------------------------------------
For a point inside roi ``m``: ``x_res = x_size / out_x`` (float32),
``x_idx = clamp(trunc((local_x + x_size / 2) / x_res), 0, out_x - 1)``, likewise ``y``; ``z`` uses
``local_z = z - cz`` (bottom).  Each voxel of each roi keeps its first ``max_pts_per_voxel - 1``
points in point order (slot 0 of mmcv's ``pts_idx_of_voxels`` is the counter, so one less than the
name says).  ``max``: the first maximum (strict ``>`` from ``-inf``: NaN never wins, ties keep the
earlier point, so even the sign of a zero matches), ``0`` when the voxel is empty or all its values
are ``-inf``/NaN.  ``avg``: float32 sum in point order divided by the kept count, ``0`` when empty.

How (no Python loops over data, no NonZero, no max-scatter)
-----------------------------------------------------------
* Inside test: broadcast ``[B, N, M]`` (or ``[M, N]``) elementwise ops, like mmcv's kernels (which
  allocate the same ``[B, N, M]`` int32 flags for ``points_in_boxes_all`` / ``RoIPointPool3d``).
  ``part`` = ``ReduceMin`` of ``where(inside, m, M)``.
* RoIAwarePool3d, in three steps:

  1. inside test on all ``[M, N]`` pairs; the inside pairs are listed in (roi, point) order with a
     ``CumSum`` of the flags and a non-reducing scatter of their roi / point ids (``ScatterND``
     without reduction; outside pairs all write one discarded dump slot).  With ``compact=True``
     (default) the list is cut to ``P`` = the number of inside pairs (an unbacked SymInt from
     ``.item()``, exported as a ``Slice`` with a runtime end); with ``compact=False`` it keeps all
     ``M * N`` slots and a validity mask, so every shape follows the input shapes (the form for
     IREE) at the cost of ``[M * N, C]`` temporaries.
  2. the voxel of each listed pair, recomputed with the identical float32 ops.
  3. one sort (``TopK``) of the unique int64 key ``(roi * V + voxel) * N + point`` (padding last):
     every (roi, voxel) group is contiguous and lists its points in index order.  Group sizes come
     from a ``scatter_add`` of ones (integer, exact), an exclusive ``CumSum`` gives each group's
     start and ``slot = position - start`` the rank of the point in its voxel.
     ``avg``: ``scatter_add`` (``ScatterElements(reduction='add')``, accumulated in sorted = point
     order in eager and onnxruntime) into ``[M * V + 1, C]`` (slot >= K and padding go to the dump
     row).  ``max``: a segmented Hillis-Steele prefix scan with the "first maximum" operator
     (``ceil(log2(K))`` steps of ``Gather``/``Where``; associative, so exact), read at each group's
     last kept position with one ``Gather``.
* RoIPointPool3d: ``TopK(k=num, largest=False)`` of ``where(inside, n, N)`` (padded with ``num``
  sentinels so ``N < num`` works) gives the first ``num`` inside points in index order; the cyclic
  repetition ``j mod cnt`` is computed in float32 (``j - floor(j / cnt) * cnt``, exact for
  ``num < 2**22``; no integer ``//`` or ``%``), then one ``Gather`` of ``[xyz, features]``.

Never ``index_put(accumulate=True)`` (ScatterND add races in onnxruntime), no integer ``//``, no
stable sort, no max/min-reducing scatter, no boolean-mask indexing, no ``amax()`` without ``dim``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from .voxelize import _iota

__all__ = [
    "points_in_boxes_all",
    "points_in_boxes_cpu",
    "points_in_boxes_part",
    "roiaware_pool3d",
    "roipoint_pool3d",
    "RoIAwarePool3d",
    "RoIPointPool3d",
]


# ---------------------------------------------------------------------------------------------
# the inside test shared by all ops
# ---------------------------------------------------------------------------------------------


def _box_params(boxes: Tensor):
    """Per-box float32 constants of mmcv's test: ``(cx, cy, cz_bottom, cz_centre, half sizes,
    cosa, sina, sizes)``, each shaped like ``boxes[..., 0]``."""
    boxes = boxes.float()
    cx, cy, cz, xs, ys, zs, rz = boxes.unbind(-1)
    neg = -rz.double()  # mmcv CPU: double sincos of the widened float angle, rounded to float
    cosa, sina = torch.cos(neg).float(), torch.sin(neg).float()
    cz_c = (cz.double() + zs.double() * 0.5).float()  # `cz += z_size / 2.0` (double, then float)
    return cx, cy, cz, cz_c, xs, ys, zs, cosa, sina


def _local(px: Tensor, py: Tensor, pz: Tensor, params):
    """mmcv's ``check_pt_in_box3d`` on broadcast shapes: ``(inside, local_x, local_y)``."""
    cx, cy, _cz, cz_c, xs, ys, zs, cosa, sina = params
    sx, sy = px - cx, py - cy
    local_x = sx * cosa - sy * sina  # == sx * cosa + sy * (-sina) exactly
    local_y = sx * sina + sy * cosa
    hx, hy = xs * 0.5, ys * 0.5
    # -h < v < h  <=>  |v| < h exactly (negation is exact; NaN fails both)
    inside = ((pz - cz_c).abs() <= zs * 0.5) & (local_x.abs() < hx) & (local_y.abs() < hy)
    return inside, local_x, local_y


def _inside_bnm(points: Tensor, boxes: Tensor) -> Tensor:
    """``[B, N, M]`` bool: point n inside box m."""
    p = points.float()
    params = [t[:, None, :] for t in _box_params(boxes)]  # [B, 1, M]
    inside, _, _ = _local(p[..., 0:1], p[..., 1:2], p[..., 2:3], params)  # points [B, N, 1]
    return inside


def _check_shapes(points: Tensor, boxes: Tensor) -> None:
    if points.dim() != 3 or points.shape[2] != 3:
        raise ValueError(f"points must be [B, N, 3], got {tuple(points.shape)}")
    if boxes.dim() != 3 or boxes.shape[2] != 7:
        raise ValueError(f"boxes must be [B, M, 7], got {tuple(boxes.shape)}")


def points_in_boxes_all(points: Tensor, boxes: Tensor) -> Tensor:
    """``[B, N, M]`` int32 flags (1 inside, 0 outside), equal to ``mmcv.ops.points_in_boxes_all`` /
    ``points_in_boxes_cpu``."""
    _check_shapes(points, boxes)
    return _inside_bnm(points, boxes).to(torch.int32)


points_in_boxes_cpu = points_in_boxes_all


def points_in_boxes_part(points: Tensor, boxes: Tensor) -> Tensor:
    """``[B, N]`` int32: index of the first box containing each point, ``-1`` for none; equal to
    ``mmcv.ops.points_in_boxes_part``."""
    _check_shapes(points, boxes)
    m = boxes.shape[1]
    if m == 0:  # statically false for an exported dynamic box count (min >= 1)
        return torch.full(points.shape[:2], -1, dtype=torch.int32, device=points.device)
    inside = _inside_bnm(points, boxes)
    box_id = _iota(boxes[0, :, 0])  # [M]
    first = torch.where(inside, box_id, torch.full_like(box_id, m)).amin(dim=-1)
    return torch.where(first < m, first, torch.full_like(first, -1)).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# RoIAwarePool3d
# ---------------------------------------------------------------------------------------------

OutSize = Union[int, Sequence[int]]


def _out_size(out_size: OutSize) -> tuple[int, int, int]:
    if isinstance(out_size, int):
        return out_size, out_size, out_size
    sizes = tuple(int(s) for s in out_size)
    if len(sizes) != 3:
        raise ValueError(f"out_size must be an int or 3 ints, got {out_size!r}")
    if max(sizes) > 256:  # mmcv packs the voxel index into 8 bits per axis
        raise ValueError("mmcv supports out sizes up to 256 per axis")
    return sizes  # type: ignore[return-value]


def _voxel_index(local: Tensor, size: Tensor, out: int) -> Tensor:
    """``clamp(int((local + size / 2) / (size / out)), 0, out - 1)`` as int64 (only evaluated for
    inside pairs, so the float -> int cast is always defined)."""
    return ((local + size * 0.5) / (size / out)).to(torch.int64).clamp(0, out - 1)


def roiaware_pool3d(
    rois: Tensor,
    pts: Tensor,
    pts_feature: Tensor,
    out_size: OutSize,
    max_pts_per_voxel: int = 128,
    mode: str = "max",
    compact: bool = True,
) -> Tensor:
    """Equal to ``mmcv.ops.RoIAwarePool3d(out_size, max_pts_per_voxel, mode)(rois, pts, pts_feature)``:
    ``[M, out_x, out_y, out_z, C]`` (see the module docstring)."""
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    ox, oy, oz = _out_size(out_size)
    nvox = ox * oy * oz
    m, n, ch = rois.shape[0], pts.shape[0], pts_feature.shape[-1]
    k = max_pts_per_voxel - 1  # slot 0 of mmcv's per-voxel list is its counter
    if k <= 0 or m == 0 or n == 0:  # static: nothing can be pooled
        return pts_feature.new_zeros(m, ox, oy, oz, ch)
    groups = m * nvox  # (roi, voxel) pairs; group id `groups` = not inside / padding

    # 1. inside test on all [M, N] pairs, then the inside pairs listed in (roi, point) order:
    #    CumSum positions + a non-reducing scatter (outside pairs all hit one discarded dump slot)
    box = _box_params(rois)
    p = pts.float()
    inside, _, _ = _local(p[None, :, 0], p[None, :, 1], p[None, :, 2], [t[:, None] for t in box])
    flat = inside.reshape(-1)
    num_pairs = flat.sum()
    dest = torch.where(flat, torch.cumsum(flat.to(torch.int64), 0) - 1, torch.full_like(flat, m * n, dtype=torch.int64))
    roi_id, point_id = _iota(rois[:, 0]), _iota(pts[:, 0])
    grid_m = roi_id[:, None].expand(m, n).reshape(-1)
    grid_n = point_id[None, :].expand(m, n).reshape(-1)
    pair_m = torch.zeros(m * n + 1, dtype=torch.int64, device=pts.device).index_put_((dest,), grid_m)
    pair_n = torch.zeros(m * n + 1, dtype=torch.int64, device=pts.device).index_put_((dest,), grid_n)
    if compact:  # P = number of inside pairs (an unbacked SymInt under export)
        size = num_pairs.clamp(min=1).item()
        torch._check(size >= 1)
        torch._check(size <= m * n)
    else:  # P = M * N: every shape follows the input shapes
        size = m * n
    pair_m, pair_n = pair_m[:size], pair_n[:size]
    valid = _iota(pair_m) < num_pairs

    # 2. voxel of every inside pair, recomputed with the identical float32 ops (bitwise the same
    #    local coordinates as in step 1)
    bp = [t.index_select(0, pair_m) for t in box]
    q = p.index_select(0, pair_n)
    _, local_x, local_y = _local(q[:, 0], q[:, 1], q[:, 2], bp)
    cz, xs, ys, zs = bp[2], bp[4], bp[5], bp[6]
    xi, yi = _voxel_index(local_x, xs, ox), _voxel_index(local_y, ys, oy)
    zi = ((q[:, 2] - cz) / (zs / oz)).to(torch.int64).clamp(0, oz - 1)
    position = _iota(pair_m)
    gid = torch.where(valid, pair_m * nvox + (xi * oy + yi) * oz + zi, torch.full_like(pair_m, groups))

    # 3. sort the pairs by (group, point): the unique key makes stability irrelevant; padding
    #    (group `groups`) sorts last
    skey, perm = torch.sort(gid * n + torch.where(valid, pair_n, position))
    sgid = gid.index_select(0, perm)
    spoint = skey - sgid * n  # the point index; uses the sort's values (IREE 3.13 needs them used)
    count = torch.zeros(groups + 1, dtype=torch.int64, device=pts.device)
    count = count.scatter_add(0, gid, torch.ones_like(gid))  # integer adds: exact
    start = torch.cumsum(count, 0) - count  # first sorted position of every group
    slot = position - start.index_select(0, sgid)  # rank of the point inside its voxel
    kept_count = count[:groups].clamp(max=k)  # points pooled per (roi, voxel)
    feats = pts_feature.index_select(0, torch.where(sgid < groups, spoint, torch.zeros_like(spoint)))

    if mode == "avg":
        target = torch.where((slot < k) & (sgid < groups), sgid, torch.full_like(sgid, groups))
        total = pts_feature.new_zeros(groups + 1, ch)
        total = total.scatter_add(0, target[:, None].expand(target.shape[0], ch), feats)[:groups]
        out = total / kept_count.clamp(min=1).to(total.dtype)[:, None]
    else:
        run = torch.where(torch.isnan(feats), torch.full_like(feats, float("-inf")), feats)
        step = 1
        while step < k:  # static: ceil(log2(k)) steps of a segmented inclusive scan
            prev = run.index_select(0, (position - step).clamp(min=0))
            # first maximum: the later value wins only when strictly greater
            run = torch.where((slot >= step)[:, None] & (prev >= run), prev, run)
            step *= 2
        last = (start[:groups] + kept_count - 1).clamp(0, size - 1)
        out = run.index_select(0, last)
        out = torch.where((kept_count > 0)[:, None] & (out > float("-inf")), out, torch.zeros_like(out))
    return out.reshape(m, ox, oy, oz, ch)


class RoIAwarePool3d(nn.Module):
    """Drop-in for ``mmcv.ops.RoIAwarePool3d`` (same constructor and ``forward(rois, pts,
    pts_feature)``); ``compact`` selects the data-dependent narrowing (see the module docstring)."""

    def __init__(self, out_size: OutSize, max_pts_per_voxel: int = 128, mode: str = "max", compact: bool = True):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        self.out_size = out_size
        self.max_pts_per_voxel = max_pts_per_voxel
        self.mode = mode
        self.compact = compact

    def forward(self, rois: Tensor, pts: Tensor, pts_feature: Tensor) -> Tensor:
        return roiaware_pool3d(rois, pts, pts_feature, self.out_size, self.max_pts_per_voxel, self.mode, self.compact)

    def extra_repr(self) -> str:
        return (
            f"out_size={self.out_size}, max_pts_per_voxel={self.max_pts_per_voxel}, mode={self.mode!r}, "
            f"compact={self.compact}"
        )


# ---------------------------------------------------------------------------------------------
# RoIPointPool3d
# ---------------------------------------------------------------------------------------------


def roipoint_pool3d(
    points: Tensor, point_features: Tensor, boxes3d: Tensor, num_sampled_points: int = 512
) -> tuple[Tensor, Tensor]:
    """Equal to ``mmcv.ops.RoIPointPool3d(num_sampled_points)(points, point_features, boxes3d)``:
    ``pooled_features [B, M, num, 3 + C]`` (xyz then features of the first ``num`` points inside each
    box in index order, repeated cyclically when fewer; zeros for empty boxes) and
    ``pooled_empty_flag [B, M]`` int32."""
    _check_shapes(points, boxes3d)
    num = int(num_sampled_points)
    if not 0 < num < 2**22:
        raise ValueError("num_sampled_points must be in [1, 2**22)")
    b, n = points.shape[:2]
    m = boxes3d.shape[1]
    p = points.float()
    params = [t[:, :, None] for t in _box_params(boxes3d)]  # [B, M, 1]
    inside, _, _ = _local(p[:, None, :, 0], p[:, None, :, 1], p[:, None, :, 2], params)  # [B, M, N]

    point_id = _iota(points[0, :, 0])  # [N]
    key = torch.where(inside, point_id, torch.full_like(point_id, n))
    key = torch.cat([key, torch.full_like(key[:, :, :1], n).expand(b, m, num)], dim=2)  # N < num ok
    first, _ = torch.topk(key, num, dim=2, largest=False, sorted=True)  # inside indices, ascending
    cnt = inside.sum(dim=2).clamp(max=num)  # [B, M]
    empty = cnt == 0
    # j mod cnt, exact in float32 for j < 2**22
    j = torch.arange(num, dtype=torch.float32, device=points.device)
    c = cnt.clamp(min=1).to(torch.float32)[:, :, None]
    cyc = (j - torch.floor(j / c) * c).to(torch.int64)  # [B, M, num]
    idx = torch.gather(first, 2, cyc)
    idx = torch.where(empty[:, :, None], torch.zeros_like(idx), idx)
    batch = _iota(points[:, 0, 0])[:, None, None] * n
    source = torch.cat([points, point_features.to(points.dtype)], dim=2).reshape(b * n, -1)
    pooled = source.index_select(0, (batch + idx).reshape(-1)).reshape(b, m, num, source.shape[1])
    pooled = torch.where(empty[:, :, None, None], torch.zeros_like(pooled), pooled)
    return pooled, empty.to(torch.int32)


class RoIPointPool3d(nn.Module):
    """Drop-in for ``mmcv.ops.RoIPointPool3d`` (same constructor and ``forward(points,
    point_features, boxes3d)``)."""

    def __init__(self, num_sampled_points: int = 512):
        super().__init__()
        self.num_sampled_points = num_sampled_points

    def forward(self, points: Tensor, point_features: Tensor, boxes3d: Tensor) -> tuple[Tensor, Tensor]:
        return roipoint_pool3d(points, point_features, boxes3d, self.num_sampled_points)

    def extra_repr(self) -> str:
        return f"num_sampled_points={self.num_sampled_points}"
