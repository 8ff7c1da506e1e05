"""Sorting integer keys in a form IREE runs in linear time.

``torch.sort`` exports to ONNX ``TopK`` (k = n), which onnxruntime runs as a real sort but IREE
3.13 lowers to ``iree_linalg_ext.sort``, an O(n^2) loop on llvm-cpu (docs/iree.md: 231 s for a
per-channel sort of 64 x 16897 values).  The op library's large sorts are of non-negative int64
keys below a bound known when exporting (linear keys of a grid, pair ranks), so for IREE exports
they can be an LSD radix sort instead: ``ceil(log2(bound) / RADIX_BITS)`` passes, each a stable
counting sort of one digit made of ops IREE compiles (a one-hot compare, ``CumSum`` along the keys, one
non-reducing scatter that inverts the permutation, gathers).  O(n * 2^RADIX_BITS) work a pass;
stable, the same order as ``torch.sort(keys, stable=True)``.  In IREE exports ``top_k_keys``
selects the k largest of a long row before it sorts them.

``sort_keys`` picks the form: the radix sort in IREE exports (``codegen.ops.forms``),
``torch.sort`` otherwise (onnxruntime's TopK is faster than the passes).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .forms import iree_exporting

#: Bits of a key per pass: 4 bins, a [4, n] running count per pass.  IREE 3.13 runs each row of a
#: pass's ``CumSum`` as a sequential loop (~2.4 ns a value), so a sort's scan work is passes x bins
#: x n: 2-bit digits scan half of what 4-bit ones do (14 x 4 against 7 x 16 rows for 27-bit keys)
#: at twice the passes' gathers and scatters.  One thread, IREE host, keys below 41 x 1440 x 1440
#: (BEVFusion's voxel grid): 30,000 keys 11.8 -> 8.5 ms, 120,000 52.3 -> 37.7, 250,000 136 -> 88
#: (3-bit digits: 94; 1-bit: 112).
RADIX_BITS = 2

def radix_sort(keys: Tensor, bound: int) -> tuple[Tensor, Tensor]:
    """``(values, perm)`` of the int64 ``keys`` [n] (all in ``[0, bound)``) in ascending order,
    ties in input order, as ``torch.sort(keys, stable=True)``."""
    if bound < 1:
        raise ValueError("bound must be positive")
    radix = 1 << RADIX_BITS
    bins = torch.arange(radix, dtype=keys.dtype, device=keys.device)
    iota = torch.arange(keys.shape[0], device=keys.device)
    values, perm = keys, iota
    shift = 0
    while (1 << shift) < bound:
        # ``//``, exported as an integer Div: ONNX BitShift takes unsigned types only (IREE's
        # importer does not legalize the Cast to uint64 before it), and torch.div(...,
        # rounding_mode=...) exports as a float32 Div + Floor, inexact above 2**24
        digit = values // (1 << shift) % radix
        # digit-major [radix, n] int32 counts: IREE scans along the innermost axis ~8x faster
        # than down the columns of an [n, radix] tensor (one thread, n = 500k: 17 vs 132 ms), and
        # int32 halves the bytes (n < 2**31)
        onehot = (digit.unsqueeze(0) == bins.unsqueeze(1)).to(torch.int32)
        seen = torch.cumsum(onehot, 1, dtype=torch.int32)  # keys up to here with each digit
        totals = onehot.sum(1, dtype=torch.int32)
        start = torch.cumsum(totals, 0, dtype=torch.int32) - totals  # first slot of each digit
        # own slot: the digit's first slot + the earlier keys with the same digit
        dest = (start.index_select(0, digit) + seen.gather(0, digit.unsqueeze(0)).squeeze(0) - 1).to(torch.int64)
        # slot -> key moving there (dest is a permutation: every slot written), then two gathers.
        # The scatter writes a fresh buffer of its own fill: IREE 3.13 ran a scatter whose data
        # and updates were one tensor in place (later reads saw its writes), and merges
        # identical fills (see sparse_conv._inverse_map)
        source = torch.full_like(values, -1 - shift).index_put((dest,), iota)
        values, perm = values.index_select(0, source), perm.index_select(0, source)
        shift += RADIX_BITS
    return values, perm


def sort_keys(keys: Tensor, bound: int, stable: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.sort(keys, stable=stable)`` of int64 keys in ``[0, bound)``; the radix form (always
    stable) in IREE exports (``codegen.ops.forms``)."""
    if iree_exporting():
        return radix_sort(keys, bound)
    # stable=False would trace to aten.sort.stable, which the ONNX exporter has no function for
    return torch.sort(keys, stable=True) if stable else torch.sort(keys)


#: IREE 3.13 keeps a TopK row on the stack of one dispatch (limit 32 KB; BEVFusion's 324,000-cell
#: heatmap asked for 2.6 MB and did not compile) and sorts it in O(n^2): IREE exports select from
#: rows longer than this (``top_k_keys``).
TOPK_ROW = 1024


def top_k_keys(keys: Tensor, k: int) -> Tensor:
    """``torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices`` of int64 ``keys``
    ``[B, n]`` (unique per row, all >= 0).

    In IREE exports (``codegen.ops.forms``), for a static n above ``TOPK_ROW`` and k at most that:
    the k-th largest key of each row found bit by bit from the top (a compare and a count over the
    row for each of the 63 value bits), the k keys at or above it moved to the front in index order (a
    running count and one scatter, a permutation), and one TopK over those k.  Unique keys: the
    same indices in the same order.  BEVFusion's top 200 of 324,000 heatmap cells: 63 counts
    instead of TopKs over 317 pieces of 1023 keys, which IREE sorted in 446 ms."""
    n = keys.shape[-1]
    if not iree_exporting() or not isinstance(n, int) or n <= TOPK_ROW or k > TOPK_ROW:
        return torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices
    kth = _largest_key_with_k_above(keys, k, 63, lambda key: key)  # int64 keys >= 0: the k-th largest
    position = chosen_positions(keys >= kth, k)  # k per row (unique keys)
    order = torch.topk(keys.gather(1, position), k, dim=-1, largest=True, sorted=True).indices
    return position.gather(1, order)


def chosen_positions(chosen: Tensor, k: int) -> Tensor:
    """The positions of the ``k`` true entries of each row of ``chosen`` ``[B, n]`` (exactly k per
    row), in increasing order, ``[B, k]`` int64: a running count and one scatter, no sort.  Slots
    put the chosen at 0..k-1 and the others at k..n-1, each in index order (a permutation)."""
    batch, n = chosen.shape
    before = torch.cumsum(chosen.to(torch.int32), 1, dtype=torch.int32)  # chosen up to here
    index = torch.arange(n, dtype=torch.int32, device=chosen.device)
    slot = torch.where(chosen, before - 1, k + index - before).to(torch.int64)
    row = torch.arange(batch, device=chosen.device).unsqueeze(1) * n
    # slot -> flat position; a fill of its own (IREE 3.13 merges identical fills, cf. radix_sort)
    flat = torch.arange(batch * n, device=chosen.device)
    source = torch.full_like(flat, -3 - k).index_put(((slot + row).reshape(-1),), flat)
    return source.view(batch, n)[:, :k] - row


def kth_largest(x: Tensor, k: int) -> Tensor:
    """``torch.topk(x, k, dim=-1).values[..., k - 1 :]``: the k-th largest value of each row of a
    float32 ``x`` (no NaN), as ``[..., 1]``.

    In IREE exports, for rows longer than ``TOPK_ROW`` (or of dynamic length), found without a
    TopK (IREE sorts the whole row in O(n^2): PV-RCNN's best 1024 of 212,224 anchor scores took
    minutes): a search over the 2^32 float32 values in their order, one bit a step from the top,
    each step a compare and a count over the row.  The threshold of a step is built from its
    order key with exact arithmetic (``_float_of_key``), so the result is the k-th largest value
    itself, bit for bit (a zero may come back as +0.0 for -0.0: they compare equal)."""
    n = x.shape[-1]
    if not iree_exporting() or (isinstance(n, int) and n <= TOPK_ROW):
        return torch.topk(x, k, dim=-1).values[..., k - 1 :]
    return search_kth_largest(x, k)


def search_kth_largest(x: Tensor, k: int) -> Tensor:
    """``kth_largest``'s IREE form (any runtime): the bit-by-bit search over the order keys."""
    return _float_of_key(_largest_key_with_k_above(x, k, 32, _float_of_key))


def _largest_key_with_k_above(x: Tensor, k: int, bits: int, value: Callable[[Tensor], Tensor]) -> Tensor:
    """The largest key ``t`` in ``[0, 2^bits)`` with at least ``k`` entries of each row of ``x``
    at or above ``value(t)`` (``value`` increasing), ``[..., 1]`` int64: decided from the top bit
    down, each bit a compare and a count over the row.  With ``value`` onto the row's values, the
    key of the k-th largest."""
    key = torch.zeros(x.shape[:-1] + (1,), dtype=torch.int64, device=x.device)
    for bit in reversed(range(bits)):
        trial = key + (1 << bit)  # key has no bit at or below `bit` set yet
        count = (x >= value(trial)).sum(-1, keepdim=True, dtype=torch.int32)
        key = torch.where(count >= k, trial, key)
    return key


#: ``2^(max(e, 1) - 127)`` for each float32 exponent field ``e`` (+inf for 255), exact in float32.
_POWERS_OF_TWO = [2.0 ** (max(e, 1) - 127) for e in range(255)] + [math.inf]


def _float_of_key(key: Tensor) -> Tensor:
    """The float32 of order key ``key`` (int64 in ``[0, 2^32)``; keys order as their values do):
    ``2^31 + bits`` for a value >= +0.0 with IEEE bits ``bits``, ``2^31 - 1 - bits(|x|)`` for one
    <= -0.0.  Exponent field ``e`` and mantissa ``m`` by integer division; the value is
    ``(significand * 2^-23) * 2^(max(e, 1) - 127)`` with significand ``2^23 + m`` (``m`` for
    ``e = 0``): both factors and the product are exact float32 (no subnormal factor).  The power
    of two comes from a constant table of 256 (+inf for ``e = 255``) as a one-hot sum, not an
    index: IREE 3.13's dispatch creation ran for many minutes (16 GB) on a table Gather repeated
    in the 32 steps, while it compiles the sum in seconds."""
    negative = key < (1 << 31)
    bits = torch.where(negative, (1 << 31) - 1 - key, key - (1 << 31))
    e = torch.div(bits, 1 << 23, rounding_mode="floor")
    m = bits - e * (1 << 23)
    significand = torch.where(e > 0, m + (1 << 23), m).to(torch.float32) * 2.0**-23
    table = torch.tensor(_POWERS_OF_TWO, dtype=torch.float32, device=key.device)
    power = torch.where(e.unsqueeze(-1) == torch.arange(256, device=key.device), table, 0.0).sum(-1)
    value = significand * power
    return torch.where(negative, -value, value)
