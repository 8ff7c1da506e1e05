"""codegen.ops.nms against mmcv's CPU kernels and mmdet3d's BEV NMS wrappers, on boxes built from
a real KITTI sweep (centres on lidar points, random sizes / yaw / scores)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mmcv.ops import box_iou_rotated as mmcv_box_iou_rotated
from mmcv.ops import nms as mmcv_nms
from mmcv.ops import nms_rotated as mmcv_nms_rotated

from codegen.ops.nms import (
    box_iou_aligned,
    box_iou_rotated,
    nms_bev_fixed,
    nms_fixed,
    nms_normal_bev_fixed,
    nms_rotated_fixed,
    priority_weight,
    xyxyr_to_xywhr,
)
from export_check import assert_exports


def kitti_boxes(points: np.ndarray, n: int, seed: int, score_step: float | None = None):
    """``n`` rotated BEV boxes ``[n, 5]`` (x, y, w, l, yaw) centred on random KITTI points, car to
    pedestrian sized, with random scores (distinct unless quantised to ``score_step``)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.from_numpy(points[:, :2].copy())
    centres = pts[torch.randint(0, pts.shape[0], (n,), generator=g)]
    sizes = torch.rand(n, 2, generator=g) * torch.tensor([3.5, 1.5]) + torch.tensor([0.5, 0.4])
    yaw = (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.pi
    scores = torch.rand(n, generator=g)
    if score_step is not None:
        scores = torch.round(scores / score_step) * score_step
    return torch.cat([centres, sizes, yaw], 1), scores


def to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[:, :2] - boxes[:, 2:4] / 2, boxes[:, :2] + boxes[:, 2:4] / 2], 1)


def to_xyxyr(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([to_xyxy(boxes), boxes[:, 4:]], 1)


def check_keep(keep: torch.Tensor, num: torch.Tensor, ref: torch.Tensor, max_out: int):
    """Fixed-size result == the original's kept indices truncated to ``max_out``, -1 padded."""
    assert keep.shape == (max_out,) and keep.dtype == torch.int64
    n = int(num)
    assert n == min(len(ref), max_out)
    assert torch.equal(keep[:n], ref[:max_out].to(torch.int64))
    assert (keep[n:] == -1).all()


# ---------------------------------------------------------------------------------------------
# rotated IoU
# ---------------------------------------------------------------------------------------------


def test_box_iou_rotated_matches_mmcv(kitti_points):
    """Random boxes plus a cluster of nearly parallel near-duplicates (the hard case for the
    geometry: crossings of almost parallel edges), against mmcv's CPU kernel."""
    boxes, _ = kitti_boxes(kitti_points, 400, seed=0)
    g = torch.Generator().manual_seed(1)
    base = boxes[:1].repeat(200, 1)
    jitter = torch.randn(200, 5, generator=g) * torch.tensor([0.3, 0.3, 0.05, 0.05, 1e-3])
    boxes = torch.cat([boxes, base + jitter])
    ours = box_iou_rotated(boxes, boxes)
    ref = mmcv_box_iou_rotated(boxes, boxes)
    assert (ref > 0.05).sum() > 40000  # plenty of real overlaps
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err
    assert torch.allclose(torch.diagonal(ours), torch.ones(600), atol=1e-6)
    # rectangular [N, M] use and the counter-clockwise convention
    assert torch.allclose(box_iou_rotated(boxes[:50], boxes[50:90]), ref[:50, 50:90], atol=1e-5)
    ccw = mmcv_box_iou_rotated(boxes[:80], boxes[:80], clockwise=False)
    assert torch.allclose(box_iou_rotated(boxes[:80], boxes[:80], clockwise=False), ccw, atol=1e-5)


def _clip_reference(b1, b2) -> float:
    """Exact IoU in float64 by Sutherland-Hodgman clipping of rectangle 1 by rectangle 2."""

    def corners(b):
        x, y, w, h, a = (float(v) for v in b)
        c, s = math.cos(a), math.sin(a)
        u, v = np.array([c * w / 2, s * w / 2]), np.array([-s * h / 2, c * h / 2])
        ctr = np.array([x, y])
        return [ctr - u - v, ctr + u - v, ctr + u + v, ctr - u + v]

    b1, b2 = np.array(b1, np.float64), np.array(b2, np.float64)
    mid = (b1[:2] + b2[:2]) / 2
    b1[:2] -= mid
    b2[:2] -= mid
    poly, clip = corners(b1), corners(b2)
    for i in range(4):
        a, b = clip[i], clip[(i + 1) % 4]
        side = lambda p: (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])  # noqa: E731
        out = []
        for j in range(len(poly)):
            p, q = poly[j], poly[(j + 1) % len(poly)]
            sp, sq = side(p), side(q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                out.append(p + sp / (sp - sq) * (q - p))
        poly = out
        if not poly:
            break
    inter = 0.0
    for j in range(len(poly)):
        p, q = poly[j], poly[(j + 1) % len(poly)]
        inter += 0.5 * (p[0] * q[1] - q[0] * p[1])
    inter = abs(inter)
    return inter / (b1[2] * b1[3] + b2[2] * b2[3] - inter)


def test_box_iou_rotated_degenerate_pairs_exact(kitti_points):
    """Duplicates, 180-degree flips, 90-degree flips with swapped sizes, touching and sliding
    boxes (edges on top of each other), with 0 / 1e-7 / 1e-6 relative perturbations: within
    1e-5 of exact float64 geometry.  (mmcv's float32 Graham scan is off by up to 1.0 here.)"""
    boxes, _ = kitti_boxes(kitti_points, 25, seed=5)
    g = torch.Generator().manual_seed(6)
    pairs = []
    for base in boxes:
        x, y, w, h, a = base.tolist()
        c, s = math.cos(a), math.sin(a)
        for rel in (0.0, 1e-7, 1e-6):
            pert = base * (1 + rel * torch.randn(5, generator=g))
            pairs += [
                pert,
                pert + torch.tensor([0, 0, 0, 0, math.pi]),
                torch.tensor([pert[0], pert[1], pert[3], pert[2], pert[4] + math.pi / 2]),
                pert + torch.tensor([-s * h, c * h, 0, 0, 0]),  # touching along the long side
                pert + torch.tensor([c * w * 0.37, s * w * 0.37, 0, 0, 0]),  # sliding along it
                torch.tensor([x + c * w / 4, y + s * w / 4, w / 2, h, a]),  # inside, 3 shared edges
            ]
    others = torch.stack(pairs)
    bases = boxes.repeat_interleave(18, 0)
    got_ab = torch.diagonal(box_iou_rotated(bases, others))
    got_ba = torch.diagonal(box_iou_rotated(others, bases))
    want = torch.tensor([_clip_reference(a, b) for a, b in zip(bases, others)], dtype=torch.float64)
    assert (want > 0.99).sum() >= 3 * 25 and (want < 1e-5).sum() >= 2 * 25  # duplicates and touching
    assert (got_ab.double() - want).abs().max() < 1e-5
    assert (got_ba.double() - want).abs().max() < 1e-5


def test_box_iou_aligned_is_mmcv_formula(kitti_points):
    """The axis-aligned IoU reproduces the kernel's float ops bitwise (a readable scalar copy of
    ``mmcv/ops/csrc/pytorch/cpu/nms.cpp``), for offset 0 and 1."""
    boxes, _ = kitti_boxes(kitti_points, 60, seed=2)
    xyxy = to_xyxy(boxes).numpy()
    for offset in (0, 1):
        ours = box_iou_aligned(torch.from_numpy(xyxy), torch.from_numpy(xyxy), offset).numpy()
        f = np.float32
        for i in range(60):
            for j in range(60):
                ai = (xyxy[i, 2] - xyxy[i, 0] + f(offset)) * (xyxy[i, 3] - xyxy[i, 1] + f(offset))
                aj = (xyxy[j, 2] - xyxy[j, 0] + f(offset)) * (xyxy[j, 3] - xyxy[j, 1] + f(offset))
                w = max(f(0), min(xyxy[i, 2], xyxy[j, 2]) - max(xyxy[i, 0], xyxy[j, 0]) + f(offset))
                h = max(f(0), min(xyxy[i, 3], xyxy[j, 3]) - max(xyxy[i, 1], xyxy[j, 1]) + f(offset))
                inter = f(w * h)
                assert ours[i, j] == f(inter / (ai + aj - inter)), (i, j)


# ---------------------------------------------------------------------------------------------
# NMS parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [300, 700])
@pytest.mark.parametrize("thr", [0.01, 0.5])
def test_nms_fixed_matches_mmcv(kitti_points, n, thr):
    boxes, scores = kitti_boxes(kitti_points, n, seed=n)
    assert scores.unique().numel() == n
    xyxy = to_xyxy(boxes)
    ref = mmcv_nms(xyxy, scores, thr)[1]
    for max_out in (len(ref) + 5, max(1, len(ref) // 2)):
        keep, num = nms_fixed(xyxy, scores, thr, max_out)
        check_keep(keep, num, ref, max_out)


@pytest.mark.parametrize("n", [300, 700])
@pytest.mark.parametrize("thr", [0.01, 0.5])
def test_nms_rotated_fixed_matches_mmcv(kitti_points, n, thr):
    boxes, scores = kitti_boxes(kitti_points, n, seed=n + 1)
    ref = mmcv_nms_rotated(boxes, scores, thr)[1]
    assert 20 < len(ref) < n  # real suppression happens
    for max_out in (len(ref) + 5, max(1, len(ref) // 2)):
        keep, num = nms_rotated_fixed(boxes, scores, thr, max_out)
        check_keep(keep, num, ref, max_out)


@pytest.mark.parametrize("thr", [0.01, 0.5])
def test_nms_bev_matches_mmdet3d(kitti_points, thr):
    """``nms_bev`` (xyxyr input, pre_max_size, post_max_size) and ``nms_normal_bev`` as mmdet3d
    calls them from ``box3d_multiclass_nms`` / CenterPoint."""
    from mmdet3d.models.layers import nms_bev, nms_normal_bev

    boxes, scores = kitti_boxes(kitti_points, 600, seed=7)
    bev = to_xyxyr(boxes)
    for pre, post in ((None, None), (200, 50), (1000, 83)):
        ref = nms_bev(bev, scores, thr, pre_max_size=pre, post_max_size=post)
        max_out = post or len(ref) + 3
        keep, num = nms_bev_fixed(bev, scores, thr, max_out, pre_max_size=pre)
        check_keep(keep, num, ref, max_out)
    ref = nms_normal_bev(bev, scores, thr)
    keep, num = nms_normal_bev_fixed(bev, scores, thr, len(ref) + 3)
    check_keep(keep, num, ref, len(ref) + 3)
    assert torch.allclose(xyxyr_to_xywhr(bev), boxes, atol=1e-5)


def test_valid_mask_is_the_score_threshold(kitti_points):
    """``valid = scores > thr`` equals mmcv's ``score_threshold`` filter (indices into the full set)."""
    boxes, scores = kitti_boxes(kitti_points, 500, seed=11)
    xyxy = to_xyxy(boxes)
    ref = mmcv_nms(xyxy, scores, 0.3, score_threshold=0.6)[1]
    keep, num = nms_fixed(xyxy, scores, 0.3, 200, valid=scores > 0.6)
    check_keep(keep, num, ref, 200)
    sel = torch.nonzero(scores > 0.6).squeeze(1)
    ref = sel[mmcv_nms_rotated(boxes[sel], scores[sel], 0.1)[1]]
    keep, num = nms_rotated_fixed(boxes, scores, 0.1, 200, valid=scores > 0.6)
    check_keep(keep, num, ref, 200)


def _greedy_reference(iou: torch.Tensor, scores: torch.Tensor, thr: float, strict: bool) -> torch.Tensor:
    """Textbook greedy NMS over a stable descending score order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    suppressed, keep = set(), []
    for pos, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            v = float(iou[i, j])
            if (v > thr) if strict else (v >= thr):
                suppressed.add(j)
    return torch.tensor(keep, dtype=torch.int64)


def test_ties_follow_the_stable_order(kitti_points):
    """Scores quantised to 0.05 (many exact ties): kept indices follow the stable order (lower
    index first among equal scores).  mmcv's CPU kernels sort with torch's unstable sort, so on
    ties their order is implementation-defined (the stated difference)."""
    boxes, scores = kitti_boxes(kitti_points, 400, seed=13, score_step=0.05)
    assert scores.unique().numel() < 25
    weight = priority_weight(scores)
    assert torch.equal(torch.argsort(-weight), torch.sort(scores, descending=True, stable=True).indices)
    xyxy = to_xyxy(boxes)
    ref = _greedy_reference(box_iou_aligned(xyxy, xyxy), scores, 0.2, strict=True)
    keep, num = nms_fixed(xyxy, scores, 0.2, 300)
    check_keep(keep, num, ref, 300)
    ref = _greedy_reference(mmcv_box_iou_rotated(boxes, boxes), scores, 0.1, strict=False)
    keep, num = nms_rotated_fixed(boxes, scores, 0.1, 300)
    check_keep(keep, num, ref, 300)


def test_eager_pairs_equal_the_dense_greedy(kitti_points):
    """The eager form (candidate pairs from axis-aligned bounds, exact IoU on those, greedy by
    fixed-point iteration) keeps exactly what the exported form (dense [N, N] overlap, unrolled
    argmax greedy) keeps: thresholds 0 (every pair a candidate) to 0.7, a cluster of near
    duplicates (long suppression chains), tied scores, a valid mask and pre_max_size."""
    from codegen.ops.nms import greedy_nms

    boxes, scores = kitti_boxes(kitti_points, 500, seed=60, score_step=0.02)
    g = torch.Generator().manual_seed(61)
    cluster = boxes[:1].repeat(80, 1) + torch.randn(80, 5, generator=g) * torch.tensor([0.4, 0.4, 0.1, 0.1, 0.3])
    boxes = torch.cat([boxes, cluster])
    scores = torch.cat([scores, torch.rand(80, generator=g)])
    valid = scores > 0.1
    xyxy = to_xyxy(boxes)
    for thr in (0.0, 0.01, 0.3, 0.7):
        for mask in (None, valid):
            dense = box_iou_rotated(boxes, boxes) >= thr
            want = greedy_nms(dense, priority_weight(scores), mask, 120)
            got = nms_rotated_fixed(boxes, scores, thr, 120, valid=mask)
            assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1]), (thr, mask is None)
            dense = box_iou_aligned(xyxy, xyxy) > thr
            want = greedy_nms(dense, priority_weight(scores), mask, 120)
            got = nms_fixed(xyxy, scores, thr, 120, valid=mask)
            assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1]), (thr, mask is None)
    assert int(nms_rotated_fixed(boxes, scores, 0.0, 120)[1]) == 1  # thr 0: the best box suppresses all
    # pairwise IoU is bitwise the matrix entry (the eager test and the exported one agree)
    i, j = torch.randint(0, len(boxes), (2, 3000), generator=g)
    assert torch.equal(box_iou_rotated(boxes[i], boxes[j], aligned=True), box_iou_rotated(boxes, boxes)[i, j])
    assert torch.equal(box_iou_aligned(xyxy[i], xyxy[j], aligned=True), box_iou_aligned(xyxy, xyxy)[i, j])


# ---------------------------------------------------------------------------------------------
# export (torch.export + ONNX, dynamic number of boxes)
# ---------------------------------------------------------------------------------------------


class RotatedNMS(torch.nn.Module):
    def forward(self, boxes, scores):
        return nms_rotated_fixed(boxes, scores, 0.1, 40)


class AlignedNMSScan(torch.nn.Module):
    def forward(self, boxes, scores):
        return nms_fixed(boxes, scores, 0.3, 200, unroll=False)


class BevNMS(torch.nn.Module):
    def forward(self, bev, scores, valid):
        return nms_bev_fixed(bev, scores, 0.2, 30, pre_max_size=128, valid=valid)


def test_export_nms_rotated(kitti_points, tmp_path):
    """Unrolled greedy (the IREE-safe default) with tied scores in the inputs."""
    n = torch.export.Dim("n", min=2, max=4096)
    inputs = [kitti_boxes(kitti_points, 300, 20, 0.05), kitti_boxes(kitti_points, 517, 21, 0.05)]
    assert_exports(RotatedNMS(), inputs, ({0: n}, {0: n}), tmp_path, exact=True)
    keep, num = RotatedNMS()(*inputs[1])
    assert int(num) == 40 and (keep >= 0).all()


def test_export_nms_aligned_scan(kitti_points, tmp_path):
    """``unroll=False``: the greedy loop as one ONNX Scan (max_out=200 exports in seconds)."""
    n = torch.export.Dim("n", min=2, max=4096)
    inputs = []
    for size, seed in ((300, 30), (650, 31)):
        boxes, scores = kitti_boxes(kitti_points, size, seed)
        inputs.append((to_xyxy(boxes), scores))
    program = assert_exports(AlignedNMSScan(), inputs, ({0: n}, {0: n}), tmp_path, exact=True)
    assert any("scan" in str(node.target) for node in program.graph.nodes)


def test_export_nms_bev(kitti_points, tmp_path):
    """pre_max_size (TopK on a dynamic number of boxes) and a score-threshold mask as input."""
    n = torch.export.Dim("n", min=130, max=8192)
    inputs = []
    for size, seed in ((400, 40), (900, 41)):
        boxes, scores = kitti_boxes(kitti_points, size, seed)
        inputs.append((to_xyxyr(boxes), scores, scores > 0.3))
    assert_exports(BevNMS(), inputs, ({0: n}, {0: n}, {0: n}), tmp_path, exact=True)


def test_top_k_indices_is_a_stable_cut():
    """``pre_max_size`` selection: the k best, ties (also across the cut) by lower index, and
    fewer than k boxes padded with indices >= N."""
    from codegen.ops.nms import top_k_indices

    g = torch.Generator().manual_seed(50)
    scores = torch.randint(0, 7, (300,), generator=g).float() / 7
    for k in (1, 17, 100, 299):
        want = torch.sort(scores, descending=True, stable=True).indices[:k]
        assert torch.equal(top_k_indices(scores, k), torch.sort(want).values)
    got = top_k_indices(scores[:5], 8)
    assert torch.equal(got[:5], torch.arange(5)) and (got[5:] >= 5).all()


def test_batched_greedy_equals_one_set_at_a_time(kitti_points):
    """``greedy_nms`` on T box sets at once (CenterPoint's per-task NMS in one loop) keeps per
    set exactly what it keeps on that set alone, tied scores and a valid mask included; and the
    batched ``priority_weight`` is the per-set one."""
    from codegen.ops.nms import greedy_nms

    sets = [kitti_boxes(kitti_points, 150, seed=70 + t, score_step=0.05) for t in range(3)]
    over = torch.stack([box_iou_rotated(b, b) >= 0.2 for b, _ in sets])
    scores = torch.stack([s for _, s in sets])
    valid = scores > 0.15
    weight = priority_weight(scores)
    keep, num = greedy_nms(over, weight, valid, 60)
    assert keep.shape == (3, 60) and num.shape == (3,)
    for t in range(3):
        assert torch.equal(weight[t], priority_weight(scores[t]))
        want = greedy_nms(over[t], priority_weight(scores[t]), valid[t], 60)
        assert torch.equal(keep[t], want[0]) and int(num[t]) == int(want[1]) > 0, t
