"""Export-friendly pure-torch point-set ops equal to mmcv's (CUDA-only) PointNet++ kernels.

Every function traces with ``torch.export.export(..., strict=False)`` with dynamic batch / point
counts and exports with the dynamo ONNX exporter (opset 18) to plain ops (Gather/GatherElements,
Sub/Mul/Add, Min, ArgMax/ArgMin, MaxPool, values-only TopK, Where, Slice): no NonZero, Unique,
ScatterElements.  In the forms ``export_forms(iree=True)`` selects (loops unrolled, no windowed
ball queries) the exported graphs also compile with IREE 3.13 (llvm-cpu) and give the eager
results: indices exactly, floats within 3e-7 (checked by hand for FPS, FPS with distances, ball
query, grouping, three_nn and three_interpolate).
Index outputs are int32 like mmcv's.  The float arithmetic follows the CUDA kernels' operation
order (``dx*dx + dy*dy + dz*dz`` left to right), so results are bitwise equal to a CPU evaluation
of the kernel formula (CUDA itself may contract to FMA and differ in the last ulp).

Sources read: ``mmcv/ops/csrc/common/cuda/{furthest_point_sample,ball_query,three_nn,
three_interpolate,group_points,gather_points}_cuda_kernel.cuh`` and the Python wrappers.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import size_hint
from .forms import iree_exporting, iree_forms

# ---------------------------------------------------------------------------------------------
# fixed-count sequential loops
# ---------------------------------------------------------------------------------------------

#: Default of every ``unroll`` argument in ``codegen.ops`` (``None`` there means "use this").
#: ``True``: sequential loops are written out step by step - a flat graph of plain ops that
#: onnxruntime and IREE 3.13 (llvm-cpu, checked by hand) both run with results equal to eager,
#: but graph size and export time grow with the step count: FPS with num=1024 is 6152 nodes,
#: 25 s of torch.export and ~8 min of ONNX export on this (2-core, shared) machine.
#: ``False``: one ONNX ``Scan`` with a static trip count: FPS num=1024 exports in ~10 s and
#: onnxruntime matches eager, but IREE 3.13 compiles that Scan and then returns wrong NMS picks
#: and segfaults on FPS (and cannot legalize the ``onnx.Loop`` a ``while_loop`` exports to),
#: hence the default.  ``codegen.export`` picks ``False`` (``export_forms``) unless IREE is
#: among the formats.
UNROLL_DEFAULT = True


@contextlib.contextmanager
def export_forms(iree: bool):
    """The op forms while exporting: for IREE, sequential loops unrolled (``UNROLL_DEFAULT``), no
    data-dependent sizes (``WINDOWED_QUERIES`` off) and the op library's other IREE forms
    (``codegen.ops.forms``: radix sorts, ...); otherwise ONNX Scans, windowed ball queries and
    TopK sorts, which onnxruntime runs faster."""
    global UNROLL_DEFAULT, WINDOWED_QUERIES
    saved = UNROLL_DEFAULT, WINDOWED_QUERIES
    UNROLL_DEFAULT, WINDOWED_QUERIES = iree, not iree
    try:
        with iree_forms(iree):
            yield
    finally:
        UNROLL_DEFAULT, WINDOWED_QUERIES = saved


def fixed_steps(
    step: Callable, carry: tuple[Tensor, ...], steps: int, unroll: bool | None = None
) -> tuple[tuple, Tensor]:
    """Run ``carry, y = step(carry)`` exactly ``steps`` times; return the final carry and the
    ``y`` stacked on a new leading dim ``[steps, ...]``.

    Eager, or ``unroll`` (default ``UNROLL_DEFAULT``): a plain Python loop, which
    ``torch.export`` unrolls into ``steps`` copies of the body.  Exporting with
    ``unroll=False``: one ``torch._higher_order_ops.scan`` over a ``[steps]`` dummy sequence,
    i.e. a single ONNX ``Scan`` with a static trip count whose body is the step, so the graph and
    the export time (~20-30 ms per unrolled node with the dynamo ONNX exporter here) no longer
    grow with ``steps``.  Both forms run the same ops in the same order: identical results."""
    if steps <= 0:
        raise ValueError("steps must be positive")
    if unroll is None:
        unroll = UNROLL_DEFAULT
    if unroll or not torch.compiler.is_exporting():
        ys = []
        for _ in range(steps):
            carry, y = step(carry)
            ys.append(y)
        return carry, torch.stack(ys)
    from torch._higher_order_ops.scan import scan

    def body(c, _x):
        c, y = step(tuple(c))
        # scan outputs must not alias the carry, and a carry must keep its init's layout (an
        # expanded step result, FPS-with-distances' index row, is made contiguous)
        return tuple(t.contiguous() for t in c), y.clone()

    xs = torch.zeros(steps, 1, device=carry[0].device)
    final, ys = scan(body, tuple(carry), xs)
    return tuple(final), ys


# ---------------------------------------------------------------------------------------------
# furthest point sampling
# ---------------------------------------------------------------------------------------------


#: FPS clouds of at least this many points (the export sample's count for a dynamic one) take
#: each step's argmax in two levels over rows of ``FPS_ARGMAX_ROW`` consecutive points: the
#: rows' maxima (MaxPool), the first row holding the largest, the first maximum within that
#: row.  onnxruntime's ArgMax is a scalar loop (36 us over 20000 floats, ReduceMax 6 us, one
#: thread): VoteNet SA1's step (20000 points) went from 126 to 90 us, while on 2048 points the
#: extra small ops cost more than they save (21 -> 25 us).  IREE exports take the two levels
#: for every cloud (``_furthest_point_sample_iree``).
FPS_BLOCKED_MIN = 8192
FPS_ARGMAX_ROW = 128


def furthest_point_sample(points: Tensor, num: int, unroll: bool | None = None) -> Tensor:
    """``mmcv.ops.furthest_point_sample(points [B, N, 3], num) -> idx [B, num]`` int32.

    Kernel semantics: ``idx[0] = 0``; a running ``temp = min(temp, d(last))`` starting at 1e10
    with ``d = (x2 - x1)^2 + (y2 - y1)^2 + (z2 - z1)^2`` (float32, summed left to right); each
    step takes the point of largest ``temp``, ties -> lowest index (``argmax`` returns the first
    maximum; mmcv's CUDA block reduction does not guarantee that on exact ties).

    ``num - 1`` sequential steps through ``fixed_steps``, each on the coordinates as three
    separate ``[B, 1, N]`` rows: three Gathers of the last pick, Sub, Mul, two Adds (the
    kernel's left-to-right sum, checked bitwise in the tests), Min and ArgMax, all over
    contiguous rows of N.  (Points kept as ``[B, N, 3]`` made every step broadcast over an
    innermost axis of 3 or 1, which onnxruntime runs element by element: 1.32 ms a step on
    20000 points against 0.08 ms in this form, two threads.)  Large clouds
    (``FPS_BLOCKED_MIN``) take a two-level argmax with the same picks."""
    batch, n = points.shape[0], points.shape[1]
    idx = torch.zeros(batch, 1, 1, dtype=torch.int64, device=points.device)
    if num <= 1:
        return idx[:, :num, 0].to(torch.int32)
    hint = size_hint(n)
    row = FPS_ARGMAX_ROW if iree_exporting() or (hint is not None and hint >= FPS_BLOCKED_MIN) else 0
    # separate copies, not views: a scan body may not close over aliasing tensors
    xs, ys, zs = (points[:, :, i].unsqueeze(1).clone() for i in range(3))  # [B, 1, N] each
    temp = torch.full((batch, 1, n), 1e10, dtype=points.dtype, device=points.device)
    grid = (xs, ys, zs)
    if row:  # 2 * row more columns, temp -1 there: never the maximum.  A static count puts no
        # guard on N, and two rows at least keep torch's pooling shape checks (>= 2 rows) true
        grid = tuple(F.pad(c, (0, 2 * row)) for c in grid)
        temp = F.pad(temp, (0, 2 * row), value=-1.0)
        offsets = torch.arange(row, device=points.device).view(1, 1, row)

    if row and iree_exporting():
        picks = _furthest_point_sample_iree(grid, temp, idx, num, offsets, unroll)
    else:

        def step(carry):
            temp, idx = carry
            dx = grid[0] - torch.gather(xs, 2, idx)
            dy = grid[1] - torch.gather(ys, 2, idx)
            dz = grid[2] - torch.gather(zs, 2, idx)
            temp = torch.minimum(temp, dx * dx + dy * dy + dz * dz)
            if row:
                start, _, within = _two_level_argmax(temp, offsets)
                idx = start + within
            else:
                idx = torch.argmax(temp, dim=2, keepdim=True)  # [B, 1, 1]
            return (temp, idx), idx

        _, picks = fixed_steps(step, (temp, idx), num - 1, unroll)  # [num - 1, B, 1, 1]
    return torch.cat((idx[:, :, 0], picks[:, :, 0, 0].transpose(0, 1)), dim=1).to(torch.int32)


def _two_level_argmax(temp: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first row (of ``row = len(offsets)`` columns) holding ``temp``'s maximum (the columns
    past the last whole row lie in the padding) and the first maximum within it: ``(start,
    columns, within)``, the row's first column and position ``[B, 1, 1]`` and its columns
    ``[B, 1, row]``; the argmax is ``start + within``."""
    row = offsets.shape[-1]
    maxima = F.max_pool2d(temp.unsqueeze(2), (1, row), (1, row)).squeeze(2)  # [B, 1, rows]
    start = maxima.argmax(2, keepdim=True) * row  # [B, 1, 1]
    columns = start + offsets
    return start, columns, torch.gather(temp, 2, columns).argmax(2, keepdim=True)


def _furthest_point_sample_iree(grid: tuple[Tensor, ...], temp: Tensor, idx: Tensor, num: int, offsets: Tensor, unroll) -> Tensor:
    """``furthest_point_sample``'s steps in IREE's form (every cloud size: the two-level argmax),
    the same picks, with the pick's coordinates carried to the next step as a ``max`` over the
    picked row (its coordinates where the column is the pick, ``-inf`` elsewhere).  Gathered by
    index in the next step, the three coordinates were fused into the distance update as three
    scalar loads per point (30 us a step on 20000 points against 3 once they come in as values,
    one thread).  The rows' MaxPool becomes a ReduceMax in IREE's copy
    (``graph_forms.row_max_pools_as_reductions``).  A step on 20000 points: 58 -> 10 us on one
    thread, 50 -> 14 us on two; on 2048 points (whole-row argmax before) 3.8 -> 1.6 and 5.5 -> 5.0 us.

    The step runs on 4-D rows ``[B, 1, 1, N]`` (the MaxPool's layout: no Unsqueeze / Squeeze a
    step) and takes the picked row's three coordinates in one gather from the coordinates
    stacked ``[3, B, 1, 1, N]``; the carried pick ``[3, B, 1, 1, 1]`` is indexed per
    coordinate.  Against three gathers, Wheres and maxima a step: 34 -> 28 ONNX nodes a step,
    iree-compile of 255 steps 49 -> 43 s, 255 steps on 20000 points 10.4 -> 8.3 ms on two
    threads (7.2 -> 7.6 ms on one).  (The distance on the stacked coordinates, one Sub and one
    Mul a step, materialised the ``[3, N]`` squares: 2.2x slower.)
    Returns the picks after the first, ``[num - 1, B, 1, 1]``."""
    rows = [c.unsqueeze(2) for c in grid]  # [B, 1, 1, N] each
    stacked = torch.stack(rows)  # [3, B, 1, 1, N]
    offsets = offsets.unsqueeze(2)  # [1, 1, 1, row]
    offsets3 = offsets.expand(3, 1, 1, 1, -1).contiguous()  # [3, 1, 1, 1, row]
    row = offsets.shape[-1]

    def step(carry):
        temp, _, pick = carry
        dx, dy, dz = (r - pick[i] for i, r in enumerate(rows))
        temp = torch.minimum(temp, dx * dx + dy * dy + dz * dz)
        maxima = F.max_pool2d(temp, (1, row), (1, row))  # [B, 1, 1, rows]
        start = maxima.argmax(3, keepdim=True) * row  # [B, 1, 1, 1]
        within = torch.gather(temp, 3, start + offsets).argmax(3, keepdim=True)
        picked = torch.gather(stacked, 4, start + offsets3)  # [3, B, 1, 1, row]
        pick = torch.where(offsets == within, picked, float("-inf")).amax(4, keepdim=True)
        idx = start + within
        return (temp, idx, pick), idx

    carry = (temp.unsqueeze(2), idx.unsqueeze(2), stacked[..., :1].clone())
    return fixed_steps(step, carry, num - 1, unroll)[1].view(num - 1, -1, 1, 1)


def furthest_point_sample_with_dist(points_dist: Tensor, num: int, unroll: bool | None = None) -> Tensor:
    """``mmcv.ops.furthest_point_sample_with_dist(points_dist [B, N, N], num) -> idx [B, num]``
    int32: the same loop with ``d = points_dist[b, last, :]`` (4 graph nodes a step: Gather,
    Min, ArgMax, Expand)."""
    # indices only: no gradient (the distances come from learned features in 3DSSD's F-FPS, and
    # the ONNX exporter's decomposition of a Scan closing over a tensor that needs grad fails)
    points_dist = points_dist.detach()
    batch, n = points_dist.shape[0], points_dist.shape[1]
    idx = torch.zeros(batch, 1, n, dtype=torch.int64, device=points_dist.device)
    if num <= 1:
        return idx[:, 0, :num].to(torch.int32)
    temp = torch.full((batch, 1, n), 1e10, dtype=points_dist.dtype, device=points_dist.device)

    def step(carry):
        temp, idx = carry
        temp = torch.minimum(temp, torch.gather(points_dist, 1, idx))
        best = torch.argmax(temp, dim=2, keepdim=True)  # [B, 1, 1]
        return (temp, best.expand(-1, -1, n)), best

    _, picks = fixed_steps(step, (temp, idx), num - 1, unroll)  # [num - 1, B, 1, 1]
    return torch.cat((idx[:, 0, :1], picks[:, :, 0, 0].transpose(0, 1)), dim=1).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# ball query
# ---------------------------------------------------------------------------------------------


#: A ball query compares every centre with every point.  It runs in blocks of centres of about
#: this many pairs, so that one block's temporaries (distances, hit mask, keys) stay in cache:
#: VoteNet SA1's 2048 x 20000 pairs took 226 ms in onnxruntime in one block against 147 ms in
#: blocks of 32 centres (two threads; 256 centres: 222 ms).
BALL_BLOCK_PAIRS = 1 << 20

#: The point count assumed for sizing the blocks when the export cannot know it: a count the
#: graph computes itself (an unbacked size, e.g. PV-RCNN's sparse-conv voxel centres).
UNKNOWN_POINT_COUNT = 16384


def _centre_blocks(m, n) -> list[slice]:
    """Blocks of ``m`` centres for ``n`` points (``BALL_BLOCK_PAIRS`` each, at least 16 centres).

    The blocks are written out in the graph, so ``m`` must be static (one block otherwise);
    ``n`` may be a dynamic size, and then its size in the export's sample (or
    ``UNKNOWN_POINT_COUNT``) sets the block: any other ``n`` gives the same results, only the
    cache fit changes."""
    if not isinstance(m, int):
        return [slice(None)]
    hint = size_hint(n) or UNKNOWN_POINT_COUNT
    size = max(16, BALL_BLOCK_PAIRS // hint)
    return [slice(start, min(start + size, m)) for start in range(0, m, size)] if size < m else [slice(None)]


def _squared_distances(c: Tensor, px: Tensor, py: Tensor, pz: Tensor) -> Tensor:
    """``(dx*dx + dy*dy) + dz*dz`` between centres ``c [..., 3]`` and the point coordinates
    ``px / py / pz`` (broadcast against ``c[..., i]``), the kernels' operation order."""
    dx = c[..., 0] - px
    dy = c[..., 1] - py
    dz = c[..., 2] - pz
    return (dx * dx + dy * dy) + dz * dz


def _first_hits(hits: Callable[[slice], Tensor], m, n, sample_num: int, like: Tensor) -> Tensor:
    """The ``sample_num`` first hit columns of every centre row, as float values ``[..., M, S]``;
    ``n`` (the column count or any bound above the hit columns) where a row has fewer hits.

    ``hits(block)`` gives the ``[..., M_block, N]`` hit mask of a block of centres; ``like`` has
    one row per column.  The key of
    a column is its index for a hit and ``n`` for a miss, ``n - hit * (n - index)`` (Cast, Mul,
    Sub: exact below 2**24 columns; a Where over the pairs took 134 ms of VoteNet SA1's 368 in
    onnxruntime); the ``sample_num`` smallest keys (a values-only TopK: the tied miss keys are
    never told apart) are the first hits in column order.

    In IREE exports no TopK (IREE sorts each row whole, O(N^2) a row: VoteNet's first ball query,
    2048 rows of 20000 points, ran for hours): the hits are found by counting
    (``_first_hits_by_counting``).  The same values."""
    if iree_exporting():

        def first_of(hit: Tensor) -> Tensor:
            return _first_hits_by_counting(hit, sample_num, n, like.dtype)

    else:
        order = torch.cumsum(torch.ones_like(like[:, 0]), 0) - 1  # arange(N) as float, one per column
        gap = n - order

        def first_of(hit: Tensor) -> Tensor:
            key = n - hit.to(gap.dtype) * gap
            return torch.topk(key, sample_num, dim=-1, largest=False, sorted=True).values

    first = [first_of(hits(block)) for block in _centre_blocks(m, n)]
    return torch.cat(first, dim=-2) if len(first) > 1 else first[0]


#: Columns per chunk of ``_first_hits_by_counting``: one IREE block of VoteNet SA1 (52 x 20000
#: pairs) 1.11 ms with 32 and 1.14 with 64, 6.4 with 128 (its in-chunk prefix product grows as L^2).
HIT_CHUNK = 32


def _first_hits_by_counting(hit: Tensor, sample_num: int, n, dtype: torch.dtype) -> Tensor:
    """``_first_hits`` of one block's hit mask ``[..., R, N]`` without TopK, running sums over the
    rows or scatters: the column of each row's ``s``-th hit, ``s = 1..sample_num``, as ``dtype``
    values ``[..., R, S]``, ``n`` where a row has fewer hits.

    The columns in chunks of ``HIT_CHUNK``: hits per chunk (a sum), their running total over the
    chunks (a short CumSum, N / 32 values), the chunk of the ``s``-th hit (how many running totals
    are below ``s``), the ``HIT_CHUNK`` flags of that chunk (a gather), their prefix counts (a
    product with a triangle of ones, exact small integers) and the position within the chunk
    (how many prefixes are below the hit's rank in it).  In IREE the previous form, a CumSum over
    each whole row and one scatter of every column to its rank's slot, took 13.4 ms for VoteNet
    SA1's 52 x 20000 block against 1.1 (the scatter: IREE writes its updates one by one); the
    whole query 520-630 ms."""
    lead, ncol, size = hit.shape[:-1], hit.shape[-1], HIT_CHUNK
    # room for a chunk of misses more than needed: at least two chunks, so that a dynamic column
    # count puts no "chunks != 1" guard on the export (torch specialises sizes of 1)
    chunks = -(-(ncol + size) // size)
    flags = F.pad(hit.to(torch.int32), (0, chunks * size - ncol)).reshape(*lead, chunks, size)
    counts = flags.sum(-1, dtype=torch.int32)  # [..., R, C]
    upto = torch.cumsum(counts, -1, dtype=torch.int32)  # hits up to and including each chunk
    want = torch.arange(1, sample_num + 1, dtype=torch.int32, device=hit.device)  # [S]
    chunk = (upto.unsqueeze(-2) < want.unsqueeze(-1)).sum(-1, dtype=torch.int32)  # [..., R, S]: C when no s-th hit
    at = chunk.clamp(max=chunks - 1).to(torch.int64)
    before = torch.gather(upto - counts, -1, at)  # hits before that chunk
    ones = torch.gather(flags, -2, at.unsqueeze(-1).expand(*at.shape, size)).to(dtype)  # [..., R, S, L]
    prefix = ones @ torch.ones(size, size, dtype=dtype, device=hit.device).triu()  # hits up to each column
    rank = (want - before).to(dtype).unsqueeze(-1)  # the hit's rank within its chunk
    column = (at * size + (prefix < rank).sum(-1)).to(dtype)
    return torch.where(chunk < chunks, column, torch.zeros_like(column) + n)


#: Large ball queries compare each window of centres (consecutive in x order) only with the
#: points of an x slab around it (the points in x order, sliced between two counts: a
#: data-dependent size).  Queries of at least ``WINDOWED_MIN_PAIRS`` centre-point pairs with a
#: static centre count and one cloud use it, in at most ``WINDOWS_MAX`` windows of at least
#: ``WINDOW_MIN_CENTRES`` centres.  VoteNet SA1 (2048 centres, 20000 SUN RGB-D points, r = 0.2):
#: 16 % of the pairs in 16 windows (13 % in 32), the query alone 390 -> 93 ms in onnxruntime (one
#: thread, 32 windows).  Each window adds ~30 graph nodes with two unbacked sizes to the export:
#: PV-RCNN (about ten such queries) exported in 414 s instead of 317 and ran in 3.3-3.4 s instead
#: of 4.0-4.4 (two threads); with 32 windows 2.9-3.1 s, but 742 s of export.  Off while exporting
#: for IREE (``export_forms``), which needs shapes known before the run.
WINDOWED_QUERIES = True
WINDOWED_MIN_PAIRS = 1 << 22
WINDOWS_MAX = 16
WINDOW_MIN_CENTRES = 64


def _windowed(m, n) -> bool:
    hint = size_hint(n) or UNKNOWN_POINT_COUNT
    return WINDOWED_QUERIES and isinstance(m, int) and m * hint >= WINDOWED_MIN_PAIRS


def _first_hits_windowed(
    inside: Callable[[Tensor], Tensor], xyz: Tensor, centres: Tensor, radius: float, sample_num: int
) -> Tensor:
    """``_first_hits`` for one cloud ``xyz [N, 3]`` and ``centres [M, 3]`` (``M`` static), the hit
    test ``inside(d2)`` true only below ``radius**2``: ``[M, S]`` float point indices, ``N`` for
    no hit.

    The centres are taken in x order, in windows; a window's candidates are the points, in x
    order, from the first with ``x >= x_lo - reach`` to the last with ``x <= x_hi + reach``
    (``reach`` a little above ``radius``, relative and absolute margins far above float32
    rounding, so a hit is never left out: ``d2 >= dx*dx``), followed by ``sample_num`` more
    rows so that a TopK of ``sample_num`` always has columns (extra rows are real points further
    in x, or appended points at infinity, all misses).  The key of a candidate is its original
    index for a hit and ``N`` for a miss; the ``sample_num`` smallest are the first hits in index
    order, as in the dense form."""
    n, m = xyz.shape[0], centres.shape[0]
    reach = radius * 1.001 + 1e-6
    order = torch.argsort(xyz[:, 0])
    count = torch.ones_like(xyz[:, 0]).sum().reshape(1)  # N as a float tensor
    points = torch.cat((xyz.index_select(0, order), torch.full_like(xyz[:1], float("inf")).expand(sample_num, 3)))
    index = torch.cat((order.to(xyz.dtype), count.expand(sample_num)))
    xs = points[:n, 0]
    corder = torch.argsort(centres[:, 0])
    sorted_centres = centres.index_select(0, corder)
    size = max(WINDOW_MIN_CENTRES, -(-m // WINDOWS_MAX))
    first = []
    for start in range(0, m, size):
        c = sorted_centres[start : start + size]
        lo_x, hi_x = c[0, 0], c[-1, 0]
        lo = (xs < lo_x - (reach + lo_x.abs() * 1e-5)).sum().item()
        hi = (xs <= hi_x + (reach + hi_x.abs() * 1e-5)).sum().item()
        torch._check_is_size(lo)
        torch._check(lo <= hi)
        torch._check(hi <= n)
        window = points[lo : hi + sample_num]
        hit = inside(_squared_distances(c.unsqueeze(1), window[:, 0], window[:, 1], window[:, 2]))
        key = torch.where(hit, index[lo : hi + sample_num], count)
        first.append(torch.topk(key, sample_num, dim=-1, largest=False, sorted=True).values)
    return torch.cat(first).index_select(0, torch.argsort(corder))


def ball_query(min_radius: float, max_radius: float, sample_num: int, xyz: Tensor, center_xyz: Tensor) -> Tensor:
    """``mmcv.ops.ball_query(min_radius, max_radius, sample_num, xyz [B, N, 3], center_xyz [B, M, 3])
    -> idx [B, M, sample_num]`` int32.

    Kernel semantics: scan points ``k = 0..N-1`` in order, take ``k`` when
    ``d2 == 0 or (min_r^2 <= d2 < max_r^2)`` (radii squared in float32), stop after
    ``sample_num``; empty slots repeat the first hit; a ball without hits is all 0.
    Vectorised: the hit mask over the ``[B, M, N]`` pairs, in blocks of centres, gives the first
    hits (``_first_hits``); one cloud with many pairs (``_windowed``) compares windows of centres
    with x slabs of the points (``_first_hits_windowed``).  With ``min_r == 0`` the test is
    ``d2 < max_r^2`` alone (``d2`` is a sum of squares; NaN is a miss either way).  Unless
    ``N >= sample_num`` is known (a static count, or a dynamic one whose lower bound is), the
    cloud gets ``sample_num`` points at infinity (never a hit) so that the TopK has its columns,
    as in ``stack_ball_query``: mmcv's kernel takes clouds of any size."""
    r_max2 = float(torch.tensor(max_radius, dtype=torch.float32) ** 2)
    r_min2 = float(torch.tensor(min_radius, dtype=torch.float32) ** 2)
    n = xyz.shape[1]
    # the coordinates as rows [B, 3, N], through a Concat in IREE exports: IREE fuses a plain
    # transpose (or the slices of [B, N, 3]) into the distance dispatch as strided scalar loads,
    # while a Concat's rows are written out and read as vectors (VoteNet SA1's query alone, one
    # thread: 112 -> 28 ms; the distances of a block of 52 centres 2.1 -> 0.11 ms)
    coords = xyz.transpose(1, 2)  # [B, 3, N]
    if iree_exporting() or not statically_known_true(n >= sample_num):
        coords = torch.cat((coords, torch.full_like(coords[..., :1], float("inf")).expand(-1, -1, sample_num)), 2)
    cloud = coords.transpose(1, 2)  # [B, N (+ S), 3]
    px, py, pz = coords[:, None, 0], coords[:, None, 1], coords[:, None, 2]  # [B, 1, N (+ S)] each

    def inside(d2: Tensor) -> Tensor:
        if r_min2 == 0.0 and r_max2 > 0.0:
            return d2 < r_max2
        return (d2 == 0) | ((d2 >= r_min2) & (d2 < r_max2))

    def hits(block: slice) -> Tensor:
        return inside(_squared_distances(center_xyz[:, block].unsqueeze(2), px, py, pz))  # [B, m, N]

    m = center_xyz.shape[1]
    if isinstance(xyz.shape[0], int) and xyz.shape[0] == 1 and _windowed(m, n):
        first = _first_hits_windowed(inside, xyz[0], center_xyz[0], max(max_radius, 0.0), sample_num)[None]
    else:
        first = _first_hits(hits, m, n, sample_num, cloud[0])  # [B, M, S]
    found = first < n
    head = first[..., :1]
    idx = torch.where(found, first, torch.where(head < n, head, torch.zeros_like(head)))
    return idx.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# gathers
# ---------------------------------------------------------------------------------------------


def grouping_operation(features: Tensor, idx: Tensor) -> Tensor:
    """``mmcv.ops.grouping_operation(features [B, C, N], idx [B, M, K]) -> [B, C, M, K]``:
    ``out[b, c, m, k] = features[b, c, idx[b, m, k]]`` (GatherElements)."""
    batch, channels = features.shape[0], features.shape[1]
    m, k = idx.shape[1], idx.shape[2]
    return _gather_columns(features, idx.reshape(batch, m * k)).reshape(batch, channels, m, k)


def gather_points(features: Tensor, idx: Tensor) -> Tensor:
    """``mmcv.ops.gather_points(features [B, C, N], idx [B, M]) -> [B, C, M]``."""
    return _gather_columns(features, idx)


def _gather_columns(features: Tensor, idx: Tensor) -> Tensor:
    """``out[b, c, l] = features[b, c, idx[b, l]]`` for ``features [B, C, N]``, ``idx [B, L]``:
    one GatherElements.

    In IREE exports (``iree_exporting()``) a one-channel ``features`` gets a zero channel more
    (and the output drops it): IREE 3.13 folds a one-channel slice of the points
    (``points[..., 3:].transpose(1, 2)``, the height of VoteNet's SUN RGB-D points, the
    intensity of KITTI's) into a strided 1-D view of the input and vectorises the gather to a
    ``vector.gather`` on it, which its LLVM lowering rejects ("LLVM Translation failed for
    operation: builtin.unrealized_conversion_cast").  Two channels keep the view 2-D."""
    index = idx.to(torch.int64).unsqueeze(1)
    channels = features.shape[1]
    if iree_exporting() and channels == 1:
        padded = F.pad(features, (0, 0, 0, 1))
        return torch.gather(padded, 2, index.expand(-1, 2, -1))[:, :1]
    return torch.gather(features, 2, index.expand(-1, channels, -1))


# ---------------------------------------------------------------------------------------------
# three-NN interpolation
# ---------------------------------------------------------------------------------------------


def three_nn(unknown: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """``mmcv.ops.three_nn(target [B, N, 3], source [B, M, 3]) -> (dist [B, N, 3], idx [B, N, 3])``.

    The kernel keeps the 3 smallest ``d = dx*dx + dy*dy + dz*dz`` with strict ``<`` (ties ->
    lowest index first) and mmcv returns ``sqrt(d)`` (the L2 distance) and int32 indices.
    Vectorised as three ``argmin`` passes (first minimum) over ``[B, N, M]``, each masking the
    previous pick, which reproduces that tie rule exactly.  Requires ``M >= 3`` (mmcv leaves
    index 0 / distance 1e20 in unused slots when ``M < 3``)."""
    k = known.unsqueeze(1)  # [B, 1, M, 3]
    d = _squared_distances(unknown.unsqueeze(2), k[..., 0], k[..., 1], k[..., 2])  # [B, N, M]
    inf = torch.full_like(d, float("inf"))
    order = torch.arange(d.shape[2], device=d.device)
    dists, idxs = [], []
    for _ in range(3):
        i = torch.argmin(d, dim=2, keepdim=True)
        dists.append(torch.gather(d, 2, i))
        idxs.append(i)
        d = torch.where(order == i, inf, d)
    dist2 = torch.cat(dists, dim=2)
    return torch.sqrt(dist2), torch.cat(idxs, dim=2).to(torch.int32)


def three_interpolate(features: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``mmcv.ops.three_interpolate(features [B, C, M], idx [B, N, 3], weight [B, N, 3]) -> [B, C, N]``:
    ``w0 * f[i0] + w1 * f[i1] + w2 * f[i2]`` (left to right, as the kernel)."""
    batch, channels = features.shape[0], features.shape[1]
    n = idx.shape[1]
    f = _gather_columns(features, idx.reshape(batch, n * 3)).reshape(batch, channels, n, 3)
    w = weight.unsqueeze(1)  # [B, 1, N, 3]
    return (w[..., 0] * f[..., 0] + w[..., 1] * f[..., 1]) + w[..., 2] * f[..., 2]


# ---------------------------------------------------------------------------------------------
# stacked variants (PV-RCNN): clouds concatenated along dim 0, sizes in *_batch_cnt
# ---------------------------------------------------------------------------------------------


def _segments(counts: Tensor, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """For ``n`` stacked rows split by ``counts [B]``: the batch of every row (``[n]`` int64, ``B``
    for rows past the total) and the first row of every batch (``[B]`` int64).  One ``[n, B]``
    comparison with the running ends, no searchsorted, no data-dependent shapes."""
    ends = torch.cumsum(counts.to(torch.int64), 0)
    rows = torch.cumsum(torch.ones_like(like[:, 0], dtype=torch.int64), 0) - 1  # arange(n)
    batch = (rows.unsqueeze(1) >= ends.unsqueeze(0)).sum(1)
    return batch, ends - counts.to(torch.int64)


def stack_ball_query(
    radius: float, sample_num: int, xyz: Tensor, xyz_batch_cnt: Tensor, center_xyz: Tensor, center_xyz_batch_cnt: Tensor
) -> Tensor:
    """``mmcv.ops.ball_query(min_r, radius, sample_num, xyz [N, 3], center_xyz [M, 3], xyz_batch_cnt [B],
    center_xyz_batch_cnt [B]) -> idx [M, sample_num]`` int32 (the stacked form PV-RCNN uses).

    Kernel semantics (``stack_ball_query_cuda_kernel.cuh``), which differ from the batched
    ``ball_query`` above: the minimum radius is ignored and there is no ``d2 == 0`` rule, a point
    is taken when ``d2 < radius^2`` (radius squared in float32); points are scanned in order
    *within the centre's own cloud* and the index is relative to that cloud's first row; free
    slots repeat the first hit; a ball without hits is ``[-1, 0, 0, ...]`` (slot 0 set to -1,
    the zero-initialised rest untouched).
    Vectorised as ``ball_query`` (``_first_hits``, in blocks of centres): over all ``[M, N]``
    pairs the key is the point's row for a hit and ``N`` for a miss (other clouds' points are
    misses), and the ``sample_num`` smallest keys are the first hits in row order.
    ``sample_num`` points at infinity (never a hit) are appended so that ``N < sample_num``
    works without copying the ``[M, N]`` keys.  With one cloud (``B == 1``, static) the batch
    comparison is skipped.  Cost: about ten passes over ``[M, N]`` float32/bool tensors (PV-RCNN's
    RoI grid: 21600 x 2048), or over the slabs of a windowed query (one cloud, ``_windowed``:
    ``_first_hits_windowed``)."""
    n = xyz.shape[0]
    r2 = float(torch.tensor(radius, dtype=torch.float32) ** 2)
    padded = torch.cat((xyz, torch.full_like(xyz[:1], float("inf")).expand(sample_num, 3)))  # [N + S, 3]
    # the coordinates as rows written out by the Concat (``ball_query``: PV-RCNN's key-point
    # queries, 2048 centres x ~16000 points, one thread 183 -> 24 ms in IREE)
    coords = torch.cat((xyz.t(), torch.full_like(xyz[:1].t(), float("inf")).expand(3, sample_num)), 1)  # [3, N + S]
    px, py, pz = coords[0:1], coords[1:2], coords[2:3]  # [1, N + S] each
    point_batch, point_start = _segments(xyz_batch_cnt, n + sample_num, padded)  # padding: batch B
    center_batch, _ = _segments(center_xyz_batch_cnt, center_xyz.shape[0], center_xyz)

    def inside(d2: Tensor) -> Tensor:
        return d2 < r2

    def hits(block: slice) -> Tensor:
        hit = inside(_squared_distances(center_xyz[block].unsqueeze(1), px, py, pz))  # [m, N + S]
        if xyz_batch_cnt.shape[0] > 1:
            hit = hit & (center_batch[block].unsqueeze(1) == point_batch.unsqueeze(0))
        return hit

    m = center_xyz.shape[0]
    if xyz_batch_cnt.shape[0] == 1 and _windowed(m, n):
        first = _first_hits_windowed(inside, xyz, center_xyz, radius, sample_num)
    else:
        first = _first_hits(hits, m, n, sample_num, padded)  # [M, S]
    found = first < n
    start = point_start.to(first.dtype).index_select(0, center_batch.clamp(max=point_start.shape[0] - 1)).unsqueeze(1)
    local = torch.where(found, first, first[:, :1]) - start  # free slots repeat the first hit
    none = ~found[:, :1]  # no hit at all: [-1, 0, 0, ...]
    slot0 = torch.where(none, torch.full_like(local[:, :1], -1), local[:, :1])
    rest = torch.where(none, torch.zeros_like(local[:, 1:]), local[:, 1:])
    return torch.cat((slot0, rest), 1).to(torch.int32)


def stack_grouping_operation(
    features: Tensor, features_batch_cnt: Tensor, idx: Tensor, idx_batch_cnt: Tensor
) -> Tensor:
    """``mmcv.ops.grouping_operation(features [N, C], idx [M, S], features_batch_cnt [B],
    idx_batch_cnt [B]) -> [M, C, S]``: ``out[m, c, s] = features[start(b) + idx[m, s], c]`` with
    ``b`` the cloud of row ``m`` (``stack_group_points_cuda_kernel.cuh``; rows past the total
    count belong to the last cloud, as in the kernel), 0 where ``idx`` is out of the cloud.

    Out of range means ``idx < 0`` or ``idx >= count(b)`` here.  The kernel only defines the
    in-range case: its bound check compares the cloud-relative index with the absolute end of the
    cloud (reads past the cloud for b > 0) and it reads before the cloud for negative indices;
    mmdet3d's ``StackQueryAndGroup`` replaces the -1 of empty balls by 0 first, so only in-range
    indices reach it."""
    n, channels = features.shape
    m, s = idx.shape
    batch, _ = _segments(idx_batch_cnt, m, idx)
    batch = batch.clamp(max=idx_batch_cnt.shape[0] - 1)
    counts = features_batch_cnt.to(torch.int64)
    start = (torch.cumsum(counts, 0) - counts).index_select(0, batch).unsqueeze(1)  # [M, 1]
    count = counts.index_select(0, batch).unsqueeze(1)
    local = idx.to(torch.int64)
    valid = (local >= 0) & (local < count)
    # out of the cloud reads an appended zero row: no pass over the [M, S, C] result to zero it
    padded = torch.cat((features, torch.zeros_like(features[:1])))
    rows = torch.where(valid, start + local, torch.full_like(local, n)).reshape(-1)
    out = padded.index_select(0, rows).reshape(m, s, channels)
    return out.permute(0, 2, 1)
