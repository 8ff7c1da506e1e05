"""Pure-torch points-in-boxes / RoIAwarePool3d / RoIPointPool3d (codegen/ops/roi.py) on real frames,
and each op exported alone (PT2 reloaded + onnxruntime vs eager at two sizes).

mmcv 2.1.0 has a CPU kernel only for ``points_in_boxes_cpu`` (asserted below): ``points_in_boxes_all``
and ``points_in_boxes_part`` are compared with it directly (``part`` = first box whose flag is set,
the CUDA kernel's loop with ``break``).  ``RoIAwarePool3d`` and ``RoIPointPool3d`` have CUDA kernels
only; their references here are plain Python loops following ``roiaware_pool3d_cuda_kernel.cuh`` /
``roipoint_pool3d_cuda_kernel.cuh``, with the inside flags taken from mmcv's own CPU kernel.

Boxes are placed on the real clouds (centres on seeded random real points, random sizes and yaws,
some duplicated with jitter so boxes overlap, some with faces exactly through real points).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from export_check import assert_exports, forbidden_onnx_ops
from mmcv.ops import points_in_boxes_cpu as mmcv_points_in_boxes_cpu

from codegen.ops.roi import (
    RoIAwarePool3d,
    RoIPointPool3d,
    points_in_boxes_all,
    points_in_boxes_part,
    roiaware_pool3d,
    roipoint_pool3d,
)

F32 = np.float32


def _rotation(yaw: float) -> tuple:
    """mmcv CPU kernel: double sincos of the float angle, rounded to float32."""
    return F32(math.cos(-float(F32(yaw)))), F32(math.sin(-float(F32(yaw))))


def _local_xy(xyz: np.ndarray, box: np.ndarray) -> tuple:
    cosa, sina = _rotation(box[6])
    sx, sy = xyz[..., 0] - box[0], xyz[..., 1] - box[1]  # float32
    return sx * cosa - sy * sina, sx * sina + sy * cosa


def place_boxes(xyz: np.ndarray, num: int, seed: int, boundary: int = 0) -> np.ndarray:
    """[num, 7] float32 LiDAR boxes on the cloud: centres at random real points (|x|, |y| < 40),
    sizes 0.5-6 m, yaw uniform; a quarter are jittered copies of others (overlaps).  The last
    ``boundary`` boxes have an x face exactly through a real point (|local_x| == x_size / 2 in
    mmcv's float32 arithmetic) and yaws whose float32 cos/sin round differently from the float64
    ones mmcv uses, so a float32 rotation flips some of those points."""
    rng = np.random.default_rng(seed)
    near = np.flatnonzero((np.abs(xyz[:, 0]) < 40) & (np.abs(xyz[:, 1]) < 40))
    centres = xyz[rng.choice(near, num - boundary)]
    size = rng.uniform([1.0, 0.5, 0.5], [6.0, 3.0, 3.0], (len(centres), 3))
    bottom = centres[:, 2] - rng.uniform(0.0, 1.0, len(centres)) * size[:, 2]
    yaw = rng.uniform(-math.pi, math.pi, len(centres))
    boxes = np.concatenate([centres[:, :2], bottom[:, None], size, yaw[:, None]], 1).astype(F32)
    dup = rng.choice(len(boxes), len(boxes) // 4, replace=False)
    boxes[dup[1:]] = boxes[dup[:-1]] + rng.normal(0, 0.3, (len(dup) - 1, 7)).astype(F32)
    # yaws whose float32 rotation (vectorised torch.cos/sin) is off by an ulp from mmcv's
    candidates = torch.from_numpy(rng.uniform(-math.pi, math.pi, 4096).astype(F32))
    off = (torch.cos(-candidates) != torch.cos(-candidates.double()).float()) | (
        torch.sin(-candidates) != torch.sin(-candidates.double()).float()
    )
    extra = []
    for yaw, a in zip(candidates[off][:boundary].numpy(), rng.choice(near, boundary)):
        q = near[np.argsort(np.hypot(*(xyz[near, :2] - xyz[a, :2]).T))[3]]  # a close neighbour
        box = np.array([xyz[a, 0], xyz[a, 1], xyz[a, 2] - 1.0, 0, 0, 2.0, yaw], F32)
        lx, ly = _local_xy(xyz[q], box)
        box[3], box[4] = 2 * abs(lx), 2 * abs(ly) + 1.0  # q exactly on an x face
        extra.append(box)
    return np.concatenate([boxes, np.asarray(extra, F32).reshape(-1, 7)]).astype(F32)


def _clouds(kitti_points, nuscenes_points):
    n = len(kitti_points)
    return np.stack([kitti_points[:, :3], nuscenes_points[:n, :3]])  # [2, N, 3]


def _features(xyz: np.ndarray, width: int, seed: int = 0) -> np.ndarray:
    """Signed features from the real coordinates (fixed random projection)."""
    w = np.random.default_rng(seed).normal(size=(3, width)).astype(F32)
    return (xyz @ w).astype(F32)


def test_mmcv_cpu_kernels():
    """Which ops mmcv 2.1.0 can run on CPU: only points_in_boxes_cpu."""
    from mmcv.ops import RoIAwarePool3d as MmcvAware
    from mmcv.ops import RoIPointPool3d as MmcvPoint
    from mmcv.ops import points_in_boxes_all as mmcv_all
    from mmcv.ops import points_in_boxes_part as mmcv_part

    p, b = torch.zeros(1, 4, 3), torch.tensor([[[0.0, 0.0, -1.0, 2.0, 2.0, 2.0, 0.0]]])
    assert mmcv_points_in_boxes_cpu(p, b).tolist() == [[[1]] * 4]
    for call in (lambda: mmcv_all(p, b), lambda: mmcv_part(p, b)):
        with pytest.raises(AssertionError, match="CUDA"):
            call()
    with pytest.raises(RuntimeError, match="cpu"):
        MmcvAware(2)(b[0], p[0], torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="cpu"):
        MmcvPoint(4)(p, torch.zeros(1, 4, 2), b)


def test_points_in_boxes_match_mmcv_cpu(kitti_points, nuscenes_points):
    pts = _clouds(kitti_points, nuscenes_points)
    boxes = np.stack([place_boxes(pts[i], 96, seed=i, boundary=16) for i in range(2)])
    tp, tb = torch.from_numpy(pts), torch.from_numpy(boxes)
    ref = mmcv_points_in_boxes_cpu(tp, tb)  # [B, N, M] int32
    ours = points_in_boxes_all(tp, tb)
    assert ours.dtype == torch.int32 and torch.equal(ours, ref)
    per_point = ref.sum(-1)
    assert int(ref.sum()) > 5000 and int((per_point >= 2).sum()) > 100  # many hits, overlaps
    # the boundary boxes really put real points on a face (strict test: outside)
    on_face = np.stack([np.abs(_local_xy(pts[0], box)[0]) == box[3] / 2 for box in boxes[0, -16:]], 1)
    assert on_face.sum() >= 16 and not ref[0][:, -16:][torch.from_numpy(on_face)].any()
    # part: the first box whose flag is set (the CUDA kernel's loop with break), else -1
    ref_part = torch.where(ref.any(-1), ref.argmax(-1), -1).to(torch.int32)
    assert torch.equal(points_in_boxes_part(tp, tb), ref_part)
    assert int((ref_part > 0).sum()) > 1000


# ---------------------------------------------------------------------------------------------
# RoIAwarePool3d
# ---------------------------------------------------------------------------------------------


def reference_roiaware(rois, pts, feats, out_size, max_pts, mode):
    """roiaware_pool3d_cuda_kernel.cuh in Python: per roi, per inside point (index order) its voxel;
    every voxel keeps its first max_pts - 1 points (slot 0 is mmcv's counter); max with strict '>'
    from -inf (argmax -1 -> 0), or the float32 sum in point order / count."""
    ox, oy, oz = (out_size,) * 3 if isinstance(out_size, int) else out_size
    inside = mmcv_points_in_boxes_cpu(torch.from_numpy(pts)[None], torch.from_numpy(rois)[None])[0].numpy()
    out = np.zeros((len(rois), ox, oy, oz, feats.shape[1]), F32)
    for m, (cx, cy, cz, xs, ys, zs, rz) in enumerate(rois):
        cosa, sina = _rotation(rz)
        voxels: dict[tuple, list[int]] = {}
        for i in np.flatnonzero(inside[:, m]):
            sx, sy = pts[i, 0] - cx, pts[i, 1] - cy
            lx, ly, lz = sx * cosa - sy * sina, sx * sina + sy * cosa, pts[i, 2] - cz
            idx = (
                min(max(int((lx + xs / F32(2)) / (xs / F32(ox))), 0), ox - 1),
                min(max(int((ly + ys / F32(2)) / (ys / F32(oy))), 0), oy - 1),
                min(max(int(lz / (zs / F32(oz))), 0), oz - 1),
            )
            members = voxels.setdefault(idx, [])
            if len(members) < max_pts - 1:
                members.append(i)
        for idx, members in voxels.items():
            for c in range(feats.shape[1]):
                if mode == "max":
                    best, hit = F32(-np.inf), False
                    for i in members:
                        if feats[i, c] > best:
                            best, hit = feats[i, c], True
                    if hit:
                        out[(m, *idx, c)] = best
                else:
                    total = F32(0)
                    for i in members:
                        total = F32(total + feats[i, c])
                    out[(m, *idx, c)] = total / F32(len(members))
    return out, max(len(v) for v in voxels.values())


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, F32).view(np.int32)


_AWARE_CASES = {
    # name: (out_size, max_pts_per_voxel, rois)  -- PartA2's 14^3 / 128, and a tight cap
    "parta2": (14, 128, 24),
    "capped": ((6, 4, 3), 4, 24),
}


@pytest.mark.parametrize("case", list(_AWARE_CASES))
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_roiaware_pool3d_matches_reference(kitti_points, case, mode):
    out_size, max_pts, num = _AWARE_CASES[case]
    pts = np.ascontiguousarray(kitti_points[:, :3])
    rois = place_boxes(pts, num, seed=3)
    feats = np.concatenate([kitti_points[:, 3:4], _features(pts, 5)], 1)
    feats[::97, 1] = -0.0  # signed zeros tie with +0.0 below: the first point must win
    feats[::89, 1] = 0.0
    feats[::101, 2] = np.nan  # mmcv's strict '>' never picks NaN
    feats[::103, 3] = -np.inf
    ref, _ = reference_roiaware(rois, pts, feats, out_size, max_pts, mode)
    args = torch.from_numpy(rois), torch.from_numpy(pts), torch.from_numpy(feats)
    for compact in (True, False):
        ours = roiaware_pool3d(*args, out_size, max_pts, mode, compact).numpy()
        assert ours.shape == ref.shape
        if mode == "max":
            np.testing.assert_array_equal(_bits(ours), _bits(ref))  # bitwise, incl. signed zeros
        else:
            np.testing.assert_array_equal(ours, ref)
    assert np.count_nonzero(ref[..., 0]) > 200  # many occupied voxels


def test_roiaware_cap_is_exercised(kitti_points):
    """The tight case really drops points beyond max_pts_per_voxel - 1 (and the module agrees)."""
    pts = np.ascontiguousarray(kitti_points[:, :3])
    rois = place_boxes(pts, 24, seed=3)
    feats = _features(pts, 3)
    ref, largest = reference_roiaware(rois, pts, feats, (6, 4, 3), 4, "avg")
    inside = mmcv_points_in_boxes_cpu(torch.from_numpy(pts)[None], torch.from_numpy(rois)[None])[0]
    assert largest == 3 and int(inside.sum(0).max()) > 3 * 6 * 4 * 3  # voxels overflow the cap
    ours = RoIAwarePool3d((6, 4, 3), 4, "avg")(*map(torch.from_numpy, (rois, pts, feats)))
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_roiaware_empty_rois(kitti_points):
    """Rois holding no point at all pool to zeros (mmcv leaves its zero buffer untouched)."""
    pts = torch.from_numpy(np.ascontiguousarray(kitti_points[:, :3]))
    rois = torch.from_numpy(place_boxes(kitti_points[:, :3], 5, seed=4))
    rois[:, 2] += 100.0
    feats = torch.from_numpy(_features(pts.numpy(), 3)) + 1.0
    for mode in ("max", "avg"):
        for compact in (True, False):
            out = roiaware_pool3d(rois, pts, feats, (3, 2, 2), 8, mode, compact)
            assert out.shape == (5, 3, 2, 2, 3) and not out.any()


# ---------------------------------------------------------------------------------------------
# RoIPointPool3d
# ---------------------------------------------------------------------------------------------


def reference_roipoint(points, feats, boxes, num):
    """roipoint_pool3d_cuda_kernel.cuh in Python: first `num` inside points in index order,
    duplicated cyclically (k % cnt) when fewer; empty flag and zeros when none."""
    b, m = boxes.shape[:2]
    pooled = np.zeros((b, m, num, 3 + feats.shape[2]), F32)
    empty = np.zeros((b, m), np.int32)
    flags = mmcv_points_in_boxes_cpu(torch.from_numpy(points), torch.from_numpy(boxes)).numpy()
    for bi in range(b):
        for mi in range(m):
            idx = [k for k in range(points.shape[1]) if flags[bi, k, mi]][:num]
            if not idx:
                empty[bi, mi] = 1
                continue
            idx = idx + [idx[k % len(idx)] for k in range(len(idx), num)]
            pooled[bi, mi] = np.concatenate([points[bi, idx], feats[bi, idx]], 1)
    return pooled, empty


def test_roipoint_pool3d_matches_reference(kitti_points, nuscenes_points):
    pts = _clouds(kitti_points, nuscenes_points)
    boxes = np.stack([place_boxes(pts[i], 20, seed=10 + i) for i in range(2)])
    boxes[:, -2:, 2] += 100.0  # two empty boxes per sample
    feats = np.stack([_features(pts[i], 6, seed=i) for i in range(2)])
    num = 64
    ref_pool, ref_empty = reference_roipoint(pts, feats, boxes, num)
    pool, empty = RoIPointPool3d(num)(*map(torch.from_numpy, (pts, feats, boxes)))
    assert empty.dtype == torch.int32 and torch.equal(empty, torch.from_numpy(ref_empty))
    np.testing.assert_array_equal(pool.numpy(), ref_pool)
    counts = mmcv_points_in_boxes_cpu(torch.from_numpy(pts), torch.from_numpy(boxes)).sum(1)
    assert int((counts > num).sum()) > 3 and int(((counts > 0) & (counts < num)).sum()) > 3  # both cases
    assert int(ref_empty.sum()) >= 4


def test_roipoint_fewer_points_than_samples(kitti_points):
    pts = np.ascontiguousarray(kitti_points[None, :200, :3])
    boxes = place_boxes(pts[0], 6, seed=5)[None]
    feats = _features(pts[0], 2)[None]
    ref = reference_roipoint(pts, feats, boxes, 512)
    ours = roipoint_pool3d(*map(torch.from_numpy, (pts, feats, boxes)), 512)
    np.testing.assert_array_equal(ours[0].numpy(), ref[0])
    assert torch.equal(ours[1], torch.from_numpy(ref[1])) and int(ours[1].sum()) < 6


# ---------------------------------------------------------------------------------------------
# export of each op alone, two sizes
# ---------------------------------------------------------------------------------------------


class _PointsInBoxes(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, points, boxes):
        return self.fn(points, boxes)




def _points_inputs(kitti_points, nuscenes_points):
    pts = _clouds(kitti_points, nuscenes_points)
    boxes = np.stack([place_boxes(pts[i], 40, seed=20 + i, boundary=4) for i in range(2)])
    a = torch.from_numpy(pts), torch.from_numpy(boxes)
    b = a[0][:, :9000].contiguous(), a[1][:, :23].contiguous()
    return [a, b]


@pytest.mark.parametrize("fn", [points_in_boxes_all, points_in_boxes_part])
def test_points_in_boxes_export(kitti_points, nuscenes_points, tmp_path, fn):
    n, m = torch.export.Dim("num_points", min=2), torch.export.Dim("num_boxes", min=1)
    inputs = _points_inputs(kitti_points, nuscenes_points)
    assert_exports(_PointsInBoxes(fn), inputs, ({1: n}, {1: m}), tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []


@pytest.mark.parametrize("mode,compact", [("max", True), ("avg", False)])
def test_roiaware_export(kitti_points, tmp_path, mode, compact):
    pts = np.ascontiguousarray(kitti_points[:, :3])
    rois = torch.from_numpy(place_boxes(pts, 16, seed=7))
    feats = torch.from_numpy(_features(pts, 4))
    a = (rois, torch.from_numpy(pts), feats)
    b = (rois[:9].contiguous(), a[1][:11000].contiguous(), feats[:11000].contiguous())
    n, m = torch.export.Dim("num_points", min=2), torch.export.Dim("num_rois", min=1)
    module = RoIAwarePool3d((6, 4, 3), 8, mode, compact)
    assert_exports(module, [a, b], ({0: m}, {0: n}, {0: n}), tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []


def test_roipoint_export(kitti_points, nuscenes_points, tmp_path):
    (pts, boxes), (pts_b, boxes_b) = _points_inputs(kitti_points, nuscenes_points)
    feats = torch.from_numpy(np.stack([_features(p.numpy(), 3, seed=1) for p in pts]))
    inputs = [(pts, feats, boxes), (pts_b, feats[:, : pts_b.shape[1]].contiguous(), boxes_b)]
    n, m = torch.export.Dim("num_points", min=2), torch.export.Dim("num_boxes", min=1)
    assert_exports(RoIPointPool3d(32), inputs, ({1: n}, {1: n}, {1: m}), tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []
