"""Export-friendly, fixed-shape NMS for BEV boxes (axis-aligned and rotated), in pure torch.

Everything here traces with ``torch.export.export(..., strict=False)`` with a dynamic number of
boxes and exports with the dynamo ONNX exporter (opset 18) to plain ops: Gather, ArgMax, Where,
Min/Max, Div, Cos/Sin, ReduceMax/ReduceMin/ReduceSum and (``nms_bev_fixed`` with
``pre_max_size`` only) values-only TopK + CumSum.  No NonMaxSuppression, NonZero/Compress,
Unique, RoiAlign or reducing scatters.  With the default ``unroll`` the exported graphs compile
with IREE 3.13 (llvm-cpu) and return the eager kept indices (checked by hand for
``nms_rotated_fixed``, ``nms_fixed`` and ``nms_bev_fixed`` with ``pre_max_size``; IoU within 3e-7).

Outputs have a fixed size ``max_out``: ``keep`` holds the kept box indices (int64, same order as
the original op returns them) padded with -1, ``num_kept`` (int64 scalar) counts the valid ones.

Two forms, the same kept indices
--------------------------------
Under ``torch.export`` (``torch.compiler.is_exporting()``) every NMS here builds the
**graph form**; called eagerly it runs the **eager form**.  Both return identical ``keep`` /
``num_kept`` (``test_eager_pairs_equal_the_dense_greedy``; every export test also compares the
exported graph with eager), both are pinned to mmcv by the parity tests.

Graph form (static shapes, what ONNX / IREE get):

1. A dense ``[N, N]`` overlap matrix ``over[i, j] = IoU(i, j) > thr`` (``>=`` for the rotated
   op, as in mmcv's kernels).
2. The visiting order (score descending, ties -> lower index) as distinct weights ``N - rank``
   from an ``[N, N]`` comparison (no sort op).
3. Exact greedy NMS in ``max_out`` sequential steps; step ``k`` picks the alive box of highest
   weight (``argmax``), writes it to ``keep[k]`` and kills every box it overlaps (one row
   gather of the 0/1 survive matrix).  A box is
   alive iff it was neither kept nor suppressed by a kept box, so this is the classic sequential
   greedy NMS truncated to its first ``max_out`` picks: ``keep == original_keep[:max_out]``.
   Once nothing is alive the remaining slots get -1.
   The steps run through ``codegen.ops.points.fixed_steps``: by default (``UNROLL_DEFAULT``)
   they are written out, 3 nodes a step (ArgMax, Gather, Mul), ~0.1 s of export time per step;
   ``unroll=False`` exports one ONNX ``Scan`` instead (export time independent of ``max_out``,
   correct in onnxruntime, not in IREE 3.13).

Its memory: the ``[N, N]`` IoU matrix (float32, 4 B/pair) and the float survive matrix (4 B/pair).
The rotated IoU is vectorised over the 4 x 4 edge pairs: its largest temporaries are
``[4, 4, N, N]`` float32 (64 B/pair each, ~6 live in an unfused runtime), i.e. up to ~400 B/pair:
500 boxes ~ 100 MB, 1000 boxes ~ 400-800 MB peak in onnxruntime (a fusing compiler such as
IREE keeps almost none of it).  The vectorised form was chosen over an unrolled 4 x 4 loop
(~150 B/pair) because it is 200 graph nodes instead of ~900 (export 5 s instead of 20 s) and
2-5x faster in onnxruntime.  Compute is O(N^2) for the matrix plus O(max_out * N) for the
greedy loop.

Eager form (``_eager_nms``; data-dependent sizes are fine outside a graph): the visiting order
by a stable sort; candidate pairs from the boxes' axis-aligned bounds (an ``[N, N]`` bool test,
1 B/pair; every pair when the threshold lets IoU 0 count); the exact IoU (the same float ops,
bitwise equal to the matrix entries) on those pairs only; the greedy result as the fixed point
of ``keep[j] = not any(keep[i] for over pairs i -> j)``, iterated over the pair list.  On 1000
boxes around a KITTI sweep 7 % of the pairs are candidates: rotated NMS ~35 ms / a few MiB
instead of ~1.3 s / 780 MiB, axis-aligned ~5 ms instead of ~33 ms (bench/ops.py).

Tie rule: equal scores are ranked by lowest index first (equivalent to
``torch.sort(scores, descending=True, stable=True)``).  mmcv's CPU kernels use
``scores.sort(descending=True)``, which is not stable on CPU (observed for N = 100: tied scores
come out in an implementation-defined order), so on exact ties mmcv's kept order (and, when tied
boxes overlap, its kept set) can differ from this one; with distinct scores the results
are identical.  Scores must not be NaN.

Rotated IoU
-----------
``box_iou_rotated`` reproduces ``mmcv.ops.box_iou_rotated`` (boxes ``x_ctr, y_ctr, w, h, angle``,
``clockwise=True`` convention) without building polygons or sorting vertices.  By Green's theorem
the area of the convex intersection ``R1 ∩ R2`` is ``1/2 * ∮ (x dy - y dx)`` over its boundary,
and that boundary is the part of each rectangle's 4 edges lying inside the other rectangle.  Each
of the 8 edges ``P + t D`` (t in [0, 1]) is clipped against the other rectangle's 4 edge lines
(Cyrus-Beck, 16 line pairs) and contributes ``1/2 * cross(start, end)``.  Each crossing point is
solved once and shared by the two pieces that meet there (see ``_intersection_area``), which
keeps nearly parallel / coincident edges (duplicate, 180-degree-flipped or touching boxes)
exact.  Coordinates are taken relative to a point between the two centres (mmcv re-centres on
the mid-point too) and everything is float32 like mmcv's kernel.
Accuracy (tests): within 1e-6 of a float64 polygon-clipping reference and of mmcv on random
boxes; on near-duplicate boxes mmcv's float32 Graham scan can be off by up to 1.0 IoU while this
stays within 1e-6 of the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from codegen.ops.forms import iree_exporting
from codegen.ops.points import fixed_steps
from codegen.ops.sort import chosen_positions, kth_largest

# ---------------------------------------------------------------------------------------------
# IoU matrices
# ---------------------------------------------------------------------------------------------


def box_iou_aligned(boxes1: Tensor, boxes2: Tensor, offset: int = 0, aligned: bool = False) -> Tensor:
    """Pairwise IoU ``[N, M]`` of axis-aligned boxes ``x1, y1, x2, y2`` with mmcv's float ops
    (``mmcv/ops/csrc/pytorch/cpu/nms.cpp``: ``area = (x2 - x1 + offset) * (y2 - y1 + offset)``,
    ``inter = max(0, min(x2) - max(x1) + offset) * max(0, ...)``,
    ``iou = inter / (area_i + area_j - inter)``), so the values are bitwise equal to the kernel's.
    ``aligned=True``: IoU ``[N]`` of row ``i`` with row ``i`` (equal to those matrix entries)."""
    if aligned:
        x1a, y1a, x2a, y2a = boxes1[:, 0], boxes1[:, 1], boxes1[:, 2], boxes1[:, 3]
    else:
        x1a, y1a, x2a, y2a = boxes1[:, 0:1], boxes1[:, 1:2], boxes1[:, 2:3], boxes1[:, 3:4]
    x1b, y1b, x2b, y2b = boxes2[:, 0], boxes2[:, 1], boxes2[:, 2], boxes2[:, 3]
    area_a = (x2a - x1a + offset) * (y2a - y1a + offset)
    area_b = (x2b - x1b + offset) * (y2b - y1b + offset)
    w = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b) + offset).clamp(min=0)
    h = (torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b) + offset).clamp(min=0)
    inter = w * h
    return inter / (area_a + area_b - inter)


#: Added to the values a clipping minimum must ignore (they then lie far beyond its bound 1).
_FAR = 1e30


def _cross(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    return ax * by - bx * ay


def _rect(cx: Tensor, cy: Tensor, cos: Tensor, sin: Tensor, hw: Tensor, hh: Tensor):
    """Counter-clockwise corners ``C - U - V, C + U - V, C + U + V, C - U + V`` and edge vectors
    ``2U, 2V, -2U, -2V`` (``U`` half-width axis, ``V`` half-height axis), stacked on a leading
    dim of 4; mmcv's ``get_rotated_vertices`` gives the same corners in the same cyclic order."""
    ux, uy = cos * hw, sin * hw
    vx, vy = -sin * hh, cos * hh
    px = torch.stack((cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx))
    py = torch.stack((cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy))
    ex = torch.stack((2 * ux, 2 * vx, -2 * ux, -2 * vx))
    ey = torch.stack((2 * uy, 2 * vy, -2 * uy, -2 * vy))
    return px, py, ex, ey


def _pieces_area2(px: Tensor, py: Tensor, ex: Tensor, ey: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    """Sum over the 4 edges ``P + t D`` clipped to ``[t0, t1]`` of ``cross(start, end)`` (twice
    the Green's-theorem area terms).  The end is measured back from the next corner so that an
    unclipped edge ends exactly where the next one starts."""
    nx, ny = torch.roll(px, -1, 0), torch.roll(py, -1, 0)
    sx, sy = px + t0 * ex, py + t0 * ey
    back = t1 - 1
    fx, fy = nx + back * ex, ny + back * ey
    term = _cross(sx, sy, fx, fy)
    return torch.where(t1 > t0, term, torch.zeros_like(term)).sum(0)


def _intersection_area(a, b) -> Tensor:
    """Area of the intersection of two counter-clockwise rectangles ``a``/``b`` (``_rect``
    output, coordinates relative to a common origin) by Green's theorem over the edges of each
    clipped to the other (Cyrus-Beck on the 4 x 4 edge-line pairs, dims ``[m, k, ...]``).

    Every crossing of an A edge line with a B edge line is solved once (``t`` on A's edge m); B's
    clip uses the projection ``u`` of that same point on B's edge k, and both use the same sign of
    ``beta`` (entering one half-plane = leaving the other).  The two clips thus order the
    crossings by the positions of the same points, so two nearly parallel, nearly coincident
    edges split their common stretch at one point (counted once) instead of double counting or
    dropping it; independent solves are off by O(ulp / sin(angle)) there, which is what breaks
    naive implementations (mmcv's float32 Graham scan included).  Exactly parallel edges
    (``beta == 0``) get a tiny positive ``beta``: the crossing moves to +-infinity on the side given
    by ``alpha`` and the same rule applies, so a shared edge (duplicate boxes) counts once and
    touching boxes' opposite edges cancel."""
    pax, pay, eax, eay = (v.unsqueeze(1) for v in a)  # A edge m on dim 0
    pbx, pby, ebx, eby = (v.unsqueeze(0) for v in b)  # B edge k on dim 1
    # A edge m is inside B edge k's half-plane iff alpha + t * beta >= 0
    beta = _cross(ebx, eby, eax, eay)
    beta = beta + (beta == 0).to(beta.dtype) * 1e-20  # beta + 0 is beta
    alpha = _cross(ebx, eby, pax - pbx, pay - pby)
    t = -alpha / beta
    qx = pax + t * eax - pbx  # crossing point relative to B's corner k
    qy = pay + t * eay - pby
    u = (qx * ebx + qy * eby) / (ebx * ebx + eby * eby)
    # entering (beta > 0) raises t0, leaving (beta < 0, the rest: beta is not 0 now) lowers t1;
    # for B the sign of beta flips.  Opposite edges of B (A) have opposite signs of beta, so each
    # max / min below has unselected entries, i.e. always includes its 0 / 1 bound.  The
    # selections are arithmetic, not Wheres (which onnxruntime ran at ~3 ns an element, 80 % of
    # a 1024-box IoU matrix): an unselected t / u times 0 is a zero, and plus _FAR it lies beyond
    # the bound 1 (t and u are finite: |beta| >= 1e-20).
    enter = (beta > 0).to(t.dtype)
    leave = 1 - enter
    ta0 = (t * enter).amax(1)
    ta1 = torch.clamp((t + enter * _FAR).amin(1), max=1.0)
    tb0 = (u * leave).amax(0)
    tb1 = torch.clamp((u + leave * _FAR).amin(0), max=1.0)
    area2 = _pieces_area2(*a, ta0, ta1) + _pieces_area2(*b, tb0, tb1)
    return 0.5 * area2


def _rotated_terms(boxes: Tensor, clockwise: bool = True) -> tuple[Tensor, ...]:
    """Per-box quantities ``[N]`` of the rotated IoU: centre, area, cos/sin of the angle, half
    sizes.  Computed once per box whichever pairs are formed, so that the dense matrix and the
    pairwise form (gathered terms) run the same float ops on the same values."""
    angle = boxes[:, 4] if clockwise else -boxes[:, 4]
    w, h = boxes[:, 2], boxes[:, 3]
    return boxes[:, 0], boxes[:, 1], w * h, torch.cos(angle), torch.sin(angle), 0.5 * w, 0.5 * h


def _rotated_iou(terms1: tuple[Tensor, ...], terms2: tuple[Tensor, ...]) -> Tensor:
    """IoU of the pairs formed by broadcasting ``terms1`` against ``terms2`` (``_rotated_terms``
    outputs shaped ``[N, 1]`` / ``[1, M]`` for a matrix, or gathered ``[P]`` / ``[P]``): only
    elementwise ops and reductions over the 4 x 4 edge dims, so every pair gets the same bits
    in either layout."""
    x1, y1, area1, cos1, sin1, hw1, hh1 = terms1
    x2, y2, area2, cos2, sin2, hw2, hh2 = terms2
    # centres relative to a common origin between them, pulled towards the smaller box
    dx = x1 - x2
    dy = y1 - y2
    frac1 = area1 / (area1 + area2).clamp(min=1e-30)
    rect1 = _rect(frac1 * dx, frac1 * dy, cos1, sin1, hw1, hh1)
    rect2 = _rect((frac1 - 1) * dx, (frac1 - 1) * dy, cos2, sin2, hw2, hh2)
    inter = _intersection_area(rect1, rect2).clamp(min=0)
    inter = torch.minimum(inter, torch.minimum(area1, area2))
    iou = inter / (area1 + area2 - inter)
    degenerate = (area1 < 1e-14) | (area2 < 1e-14)
    return torch.where(degenerate, torch.zeros_like(iou), iou)


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor, clockwise: bool = True, aligned: bool = False) -> Tensor:
    """Pairwise IoU ``[N, M]`` of rotated boxes ``x_ctr, y_ctr, w, h, angle`` (radians), equal to
    ``mmcv.ops.box_iou_rotated(boxes1, boxes2, 'iou', aligned=aligned, clockwise=clockwise)``
    within ~1e-6 (``aligned=True``: ``[N]``, row ``i`` with row ``i``, bitwise equal to those
    matrix entries).  Boxes with ``w * h < 1e-14`` get IoU 0 as in mmcv."""
    terms1, terms2 = _rotated_terms(boxes1, clockwise), _rotated_terms(boxes2, clockwise)
    if aligned:
        return _rotated_iou(terms1, terms2)
    return _rotated_iou(tuple(t[:, None] for t in terms1), tuple(t[None, :] for t in terms2))


# ---------------------------------------------------------------------------------------------
# greedy selection
# ---------------------------------------------------------------------------------------------


def priority_weight(scores: Tensor, index: Tensor | None = None) -> Tensor:
    """Distinct float weights ``N - rank`` (``N`` = best) of a stable descending score order
    along the last axis: higher score first, equal scores by lower ``index`` (default:
    position).  Computed from an ``[..., N, N]`` comparison, so it is exact on every runtime (no
    sort: ``aten.sort.stable`` has no ONNX lowering, and TopK's tie order is not defined in
    torch eager)."""
    n = scores.shape[-1]
    if index is None:
        index = torch.arange(n, device=scores.device)
    si, sj = scores.unsqueeze(-1), scores.unsqueeze(-2)
    before = (sj > si) | ((sj == si) & (index.unsqueeze(-2) < index.unsqueeze(-1)))  # j ranks before i
    return (n - before.sum(-1)).to(torch.float32)


def greedy_nms(
    over: Tensor, weight: Tensor, valid: Tensor | None, max_out: int, unroll: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Exact greedy NMS in ``max_out`` sequential steps (``fixed_steps``: unrolled, or one ONNX
    Scan with ``unroll=False``), on one box set or on ``T`` independent sets at once.

    ``over[i, j]`` (bool ``[N, N]`` or ``[T, N, N]``): keeping ``i`` suppresses ``j``; ``weight``
    (``[N]`` / ``[T, N]``, distinct within a set, > 0.5, e.g. ``priority_weight``): visiting
    order, highest first; ``valid`` (bool, like ``weight``): boxes that take part at all.
    ``alive`` holds the weight of every box still alive (0 once kept or suppressed) plus a
    sentinel slot ``N`` at 0.5 that is never suppressed: ``argmax`` picks the best alive box, or
    the sentinel once none is left, and one row of the 0/1 ``survive`` matrix updates ``alive``
    - 3 graph nodes (ArgMax, Gather, Mul) a step, 4 for ``T`` sets (one loop serves them all).
    Returns ``keep`` ``[max_out]`` / ``[T, max_out]`` int64 (-1 padded) and ``num_kept`` (int64,
    per set)."""
    batched = over.dim() == 3
    if not batched:
        over, weight = over.unsqueeze(0), weight.unsqueeze(0)
        valid = valid.unsqueeze(0) if valid is not None else None
    t, n = weight.shape
    arange = torch.arange(n, device=over.device)
    eye = arange.unsqueeze(1) == arange.unsqueeze(0)
    survive = (~(over | eye)).to(torch.float32)
    survive = torch.cat((survive, survive.new_ones(t, n, 1)), dim=2)
    survive = torch.cat((survive, survive.new_ones(t, 1, n + 1)), dim=1)  # sentinel row/column
    rows = survive.reshape(t * (n + 1), n + 1)  # set k's rows start at k * (n + 1)
    base = torch.arange(t, device=over.device) * (n + 1) if t > 1 else None
    alive = weight.to(torch.float32)
    if valid is not None:
        alive = torch.where(valid.to(torch.bool), alive, torch.zeros_like(alive))
    alive = torch.cat((alive, alive.new_full((t, 1), 0.5)), dim=1)  # [T, N + 1]

    def step(carry):
        (alive,) = carry
        best = torch.argmax(alive, dim=1)  # [T]
        return (alive * torch.index_select(rows, 0, best if base is None else base + best),), best

    if max_out <= 0:
        keep = torch.zeros((t, 0), dtype=torch.int64, device=over.device)
    else:
        _, pos = fixed_steps(step, (alive,), max_out, unroll)  # [max_out, T]
        pos = pos.reshape(max_out, t).transpose(0, 1)
        keep = torch.where(pos < n, pos, torch.full_like(pos, -1))
    if not batched:
        keep = keep.reshape(keep.shape[1])
    return keep, (keep >= 0).sum(-1)


# ---------------------------------------------------------------------------------------------
# eager form: candidate pairs only, greedy by fixed-point iteration
# ---------------------------------------------------------------------------------------------


def _visit_order(scores: Tensor, index: Tensor | None = None) -> Tensor:
    """Positions in visiting order: score descending, equal scores by lower ``index`` (default:
    position), the order ``priority_weight`` encodes.  Eager only (a stable sort)."""
    if index is None:
        return torch.sort(scores, descending=True, stable=True).indices
    by_index = torch.sort(index, stable=True).indices
    return by_index[torch.sort(scores[by_index], descending=True, stable=True).indices]


def _greedy_pairs(order: Tensor, first: Tensor, second: Tensor, max_out: int) -> tuple[Tensor, Tensor]:
    """Exact greedy NMS from the suppressing pairs only: ``first[p] < second[p]`` are positions in
    visiting ``order`` such that keeping ``first`` suppresses ``second``.

    The greedy result is the unique ``keep`` with ``keep[j] = not any(keep[i] for pairs (i, j))``
    (by induction over the visiting order); iterating that map from all-kept reaches it, and
    position ``j`` is final after at most (longest suppression chain ending at ``j``) + 1 rounds,
    so the loop stops at the first round that changes nothing.  Each round is O(pairs)."""
    m = order.shape[0]
    keep = torch.ones(m, dtype=torch.bool, device=order.device)
    while True:
        suppressed = torch.zeros_like(keep)
        suppressed[second[keep[first]]] = True
        if torch.equal(~suppressed, keep):
            break
        keep = ~suppressed
    kept = order[keep][: max(max_out, 0)]
    out = torch.full((max(max_out, 0),), -1, dtype=torch.int64, device=order.device)
    out[: kept.shape[0]] = kept
    return out, torch.tensor(kept.shape[0], dtype=torch.int64, device=order.device)


def _eager_nms(boxes, scores, valid, max_out, index, candidates, pair_over) -> tuple[Tensor, Tensor]:
    """The eager form of every NMS here: visiting order by a stable sort, the pairs ``i`` before
    ``j`` that ``candidates(sorted boxes)`` (bool ``[M, M]``) flags, the exact test
    ``pair_over(sorted boxes, i, j)`` (or none) on those only, then ``_greedy_pairs``."""
    order = _visit_order(scores, index)
    if valid is not None:
        order = order[valid.to(torch.bool)[order]]
    ranked = boxes[order]
    first, second = torch.triu(candidates(ranked), diagonal=1).nonzero().unbind(1)
    if pair_over is not None:
        over = pair_over(ranked, first, second)
        first, second = first[over], second[over]
    return _greedy_pairs(order, first, second, max_out)


def _overlap_candidates(lo: Tensor, hi: Tensor, margin: Tensor) -> Tensor:
    """Bool ``[M, M]``: the axis-aligned bounds ``lo``/``hi`` (``[M, 2]``) of the two boxes,
    widened by ``margin`` (``[M]``) each, overlap.  Compared on contiguous columns: the
    broadcast comparisons are vectorised then (on strided columns they ran ~10x slower)."""
    near = None
    for a in range(2):
        lo_a = (lo[:, a] - margin).contiguous()
        hi_a = (hi[:, a] + margin).contiguous()
        ok = (lo_a[:, None] <= hi_a[None, :]) & (lo_a[None, :] <= hi_a[:, None])
        near = ok if near is None else near & ok
    return near


def _aligned_candidates(iou_threshold: float, offset: int):
    """Pairs that can reach ``IoU > iou_threshold`` (axis-aligned): for a threshold >= 0 those
    whose boxes, widened by 1e-4 of their size + 1e-6 (+ ``offset``), overlap: the others have
    ``inter == 0`` exactly, hence IoU 0 (or NaN for empty boxes), which is never over; every pair
    for a negative threshold."""

    def candidates(b: Tensor) -> Tensor:
        if iou_threshold < 0:
            return torch.ones(b.shape[0], b.shape[0], dtype=torch.bool, device=b.device)
        size = (b[:, 2:4] - b[:, 0:2]).abs().amax(1)
        return _overlap_candidates(b[:, 0:2], b[:, 2:4], size * 1e-4 + 1e-6 + abs(offset))

    return candidates


def _rotated_candidates(iou_threshold: float):
    """Pairs that can reach ``IoU >= iou_threshold`` (rotated): for a positive threshold those
    whose axis-aligned bounds, widened by 1e-4 of their size + 1e-6, overlap (the others are apart
    by far more than float error, so their exact IoU is 0); every pair otherwise."""

    def candidates(b: Tensor) -> Tensor:
        if not iou_threshold > 0:
            return torch.ones(b.shape[0], b.shape[0], dtype=torch.bool, device=b.device)
        c, s = torch.cos(b[:, 4]).abs(), torch.sin(b[:, 4]).abs()
        w, h = b[:, 2].abs(), b[:, 3].abs()
        half = torch.stack((w * c + h * s, w * s + h * c), 1) * 0.5
        return _overlap_candidates(b[:, 0:2] - half, b[:, 0:2] + half, half.amax(1) * 1e-4 + 1e-6)

    return candidates


def _rotated_pair_over(iou_threshold: float, clockwise: bool):
    def pair_over(b: Tensor, first: Tensor, second: Tensor) -> Tensor:
        terms = _rotated_terms(b, clockwise)
        iou = _rotated_iou(tuple(t[first] for t in terms), tuple(t[second] for t in terms))
        return iou >= iou_threshold

    return pair_over


def _nms_rotated(boxes, scores, iou_threshold, max_out, clockwise, valid, unroll, index=None):
    """Rotated NMS (``IoU >= iou_threshold``) on ``xywhr`` boxes: the dense ``[N, N]`` form with
    the unrolled greedy when exporting, the candidate-pair form in eager (same kept indices)."""
    if torch.compiler.is_exporting():
        over = box_iou_rotated(boxes, boxes, clockwise) >= iou_threshold
        return greedy_nms(over, priority_weight(scores, index), valid, max_out, unroll)
    return _eager_nms(
        boxes,
        scores,
        valid,
        max_out,
        index,
        _rotated_candidates(iou_threshold),
        _rotated_pair_over(iou_threshold, clockwise),
    )


# ---------------------------------------------------------------------------------------------
# public NMS entry points
# ---------------------------------------------------------------------------------------------


def nms_fixed(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_out: int,
    offset: int = 0,
    valid: Tensor | None = None,
    unroll: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Axis-aligned NMS equal to ``mmcv.ops.nms(boxes, scores, iou_threshold, offset)[1][:max_out]``.

    ``boxes`` ``[N, 4]`` (x1, y1, x2, y2), ``scores`` ``[N]``; a box is suppressed by a kept box
    when ``IoU > iou_threshold`` (mmcv CPU kernel; IoU bitwise equal to it).  ``valid``
    (optional bool ``[N]``) excludes boxes, e.g. ``scores > score_threshold`` (mmcv's
    ``score_threshold`` argument) without a data-dependent shape.
    Returns ``keep`` ``[max_out]`` int64 padded with -1 and ``num_kept`` int64 scalar."""
    if torch.compiler.is_exporting():
        over = box_iou_aligned(boxes, boxes, offset) > iou_threshold
        return greedy_nms(over, priority_weight(scores), valid, max_out, unroll)
    pair_over = lambda b, i, j: box_iou_aligned(b[i], b[j], offset, aligned=True) > iou_threshold  # noqa: E731
    return _eager_nms(boxes, scores, valid, max_out, None, _aligned_candidates(iou_threshold, offset), pair_over)


def nms_rotated_fixed(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    max_out: int,
    clockwise: bool = True,
    valid: Tensor | None = None,
    unroll: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotated NMS equal to ``mmcv.ops.nms_rotated(boxes, scores, iou_threshold, clockwise=...)[1][:max_out]``.

    ``boxes`` ``[N, 5]`` (x_ctr, y_ctr, w, h, angle); suppression when ``IoU >= iou_threshold``
    (mmcv CPU kernel).  Returns ``keep`` ``[max_out]`` int64 padded with -1 and ``num_kept``."""
    return _nms_rotated(boxes, scores, iou_threshold, max_out, clockwise, valid, unroll)


def top_k_mask(x: Tensor, k: int) -> Tensor:
    """Which entries are the ``k`` largest along the last axis (bool, the shape of ``x``), equal
    values by lower index, also at the cut (``x.shape[-1] >= k``). A values-only TopK finds the
    k-th largest value; a CumSum over the entries tied with it takes the first ones by index.
    ``torch.topk``'s own choice among ties is unspecified in eager, where ONNX TopK takes the
    lower index: this mask is the same on every runtime."""
    kth = kth_largest(x, k)  # a values-only TopK; in IREE exports, a search without one
    above = x > kth
    tied = x == kth
    need = k - above.sum(-1, keepdim=True)
    return above | (tied & (torch.cumsum(tied.to(torch.int64), -1) <= need))


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``[k]`` (in increasing index order) of the ``k`` best ``scores`` ``[N]``, equal
    scores by lower index, also at the cut; ``N < k`` is allowed (indices ``>= N`` then mark
    padding).  Built from two *values-only* TopKs over a static ``k`` (``top_k_mask``, then the
    taken indices encoded as exact float keys): IREE 3.13 fails to compile a TopK whose indices
    output is used over a dynamic axis.  In IREE exports, no TopK at all (IREE sorts a TopK's
    whole row, O(n^2)): ``kth_largest`` searches the cut, ``chosen_positions`` lists the taken."""
    n = scores.shape[0]
    padded = torch.cat((scores, scores.new_full((k,), -math.inf)))
    take = top_k_mask(padded, k)
    if iree_exporting():
        return chosen_positions(take.unsqueeze(0), k)[0]
    position = torch.arange(n + k, device=scores.device).to(torch.float32)  # exact below 2**24
    key = torch.where(take, position, position + (n + k))
    return torch.topk(key, k, largest=False).values.to(torch.int64)


def xyxyr_to_xywhr(boxes: Tensor) -> Tensor:
    """``x1, y1, x2, y2, r`` -> ``x_ctr, y_ctr, w, h, r`` exactly as ``mmdet3d nms_bev`` does."""
    return torch.stack(
        (
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
            boxes[:, 4],
        ),
        dim=-1,
    )


def nms_bev_fixed(
    boxes: Tensor,
    scores: Tensor,
    thresh: float,
    max_out: int,
    pre_max_size: int | None = None,
    valid: Tensor | None = None,
    unroll: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``mmdet3d.models.layers.nms_bev(boxes, scores, thresh, pre_max_size, post_max_size=max_out)``
    with a fixed-size output.

    ``boxes`` ``[N, 5]`` in mmdet3d's ``xyxyr`` BEV form (``xywhr2xyxyr`` output); as in mmdet3d
    the ``pre_max_size`` best-scored boxes (TopK) are converted back to ``xywhr`` and run through
    mmcv's ``nms_rotated`` (``clockwise=True``, suppression when ``IoU >= thresh``), and the kept
    indices are cut to ``post_max_size`` (= ``max_out``).  ``valid`` models the ``score_thr``
    filter of ``box3d_multiclass_nms`` (``scores > score_thr``) without dynamic shapes.
    Ties: stable (lower index first), also for boxes tied exactly at the ``pre_max_size`` cut
    (``top_k_indices``); mmdet3d's own ``sort`` is unstable there.
    Returns ``keep`` ``[max_out]`` (indices into ``boxes``, -1 padded) and ``num_kept``."""
    if pre_max_size is None:
        return _nms_rotated(xyxyr_to_xywhr(boxes), scores, thresh, max_out, True, valid, unroll)
    index = top_k_indices(scores, pre_max_size)
    n = scores.shape[0]
    real = index < n
    safe = torch.where(real, index, torch.zeros_like(index))
    sub = xyxyr_to_xywhr(boxes[safe])
    sub_valid = real if valid is None else real & valid.to(torch.bool)[safe]
    keep, num = _nms_rotated(sub, scores[safe], thresh, max_out, True, sub_valid, unroll, index)
    index_ext = torch.cat((index, index.new_full((1,), -1)))
    return index_ext[keep], num


def nms_normal_bev_fixed(
    boxes: Tensor, scores: Tensor, thresh: float, max_out: int, valid: Tensor | None = None, unroll: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``mmdet3d.models.layers.nms_normal_bev(boxes, scores, thresh)[:max_out]`` (axis-aligned
    NMS on ``xyxyr[:, :4]``, ``IoU > thresh``)."""
    return nms_fixed(boxes[:, :4], scores, thresh, max_out, valid=valid, unroll=unroll)
