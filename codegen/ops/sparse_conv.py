"""Sparse 3D convolution in plain torch, equal to spconv 2.3.8 on CPU and traceable by torch.export.

spconv's layers (``SubMConv3d``, ``SparseConv3d``, ``SparseInverseConv3d``, ``SparseConvTranspose3d``)
run compiled kernels (a hash-map rulebook and a gather/GEMM/scatter loop) that neither
``torch.export`` nor ONNX can see.  This module rebuilds both halves from ordinary tensor ops:

* **Rulebook** (which input site feeds which output site through which kernel offset), computed
  from the active-site indices alone, never from a dense grid of the scene: sites are encoded
  as linear int64 keys and neighbours are found by a sort-merge join (one ``torch.sort`` of the
  site keys together with the query keys, then a ``cumsum``), i.e. a ``searchsorted`` written
  with ops that ONNX has.  Memory is O(N * kernel volume).

  - SubM: output sites = input sites.  Only the 13 offsets of one half of a 3x3x3 kernel are
    looked up (the other half are the same pairs swapped, as spconv does) and only one query
    per kernel *row* (dz, dy) is merged: the sites of a row are consecutive in key order, so the
    dx = -1, 0, +1 partners sit at consecutive sorted positions ("chain").  The key space is
    padded by the kernel reach on every axis, so a shifted key never wraps into another row,
    plane or batch and needs no bounds mask.
  - Strided / transposed: every (kernel offset k, input i) gives at most one output coordinate;
    the output sites are the unique valid ones, **in spconv 2.3.8's CPU order**: spconv's
    ``generate_conv_inds_cpu`` scans k outer, i inner and numbers an output site when it first
    appears; here the first appearance of each unique key is found with one sort of
    ``key * P + j`` (j = position in that scan) and the sites are emitted in order of it.  Pairs
    (and so the summation order per site) are the same as spconv's.
  - Inverse: the pairs of the forward layer with the same ``indice_key``, reversed; output sites
    and spatial shape are that layer's input ones.

* **Convolution**: gather - GEMM - scatter, ``out[pairs_out[k]] += in[pairs_in[k]] @ W[k]`` for
  each of the (static) kernel offsets, accumulated as ``out.index_put((dst,), out[dst] + x)`` (a
  non-reducing ONNX ScatterND: within one offset each output row appears once); SubM starts from the centre offset ``in @ W[centre]`` as spconv does.

torch.export (strict=False) with a dynamic number of sites N, and the dynamo ONNX exporter
(opset 18, onnxruntime): the SubM layer has no data-dependent shape except the per-offset pair
counts (``nonzero`` -> unbacked sizes that only feed gathers and scatters).  A strided layer's
output count M is the size of a ``nonzero`` and exports as an unbacked size (with a run-time
assert M >= 1, which spconv's ``SparseSequential`` needs to branch on ``indices.shape[0] != 0``).
Only ops with ONNX translations are used (sort, cumsum, nonzero, gather, index_put; no
searchsorted, no index_add, no min/max scatter).

Differences from spconv 2.3.8 CPU, all where spconv has no usable result: a bias is added
(spconv's CPU inference path asserts "cpu don't support act and bias"; training mode adds it the
same way), and when a traced strided layer has no output site the run-time assert fails (spconv's
CUDA path raises too).  Like spconv, SubM layers ignore ``padding``/``stride`` and 1x1 layers
multiply by the raw weight memory viewed as ``[in, out]``.

Drop-in forwards for spconv's ``SparseConvolution`` (``sparse_conv_forward`` or the three per-kind
names) and ``to_dense`` for ``SparseConvTensor.dense``; ``patch_spconv()`` swaps them in for a block.
Rulebooks are cached in ``x.indice_dict`` under ``(RULEBOOK_TAG, indice_key)`` so they never clash
with spconv's own ``IndiceData`` entries, and keep spconv's semantics: SubM layers with the same key
share pairs, an inverse layer uses the pairs of the forward layer with its key.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

RULEBOOK_TAG = "mmdet3d_export.sparse_conv"
_INT64_LIMIT = 2**62
# site indices are int32 in spconv: bounding the data-dependent pair counts by it keeps the
# bounds torch.export derives for sums of them (and the ONNX constants of those) inside int64
_MAX_SITES = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# geometry helpers (all static Python ints)
# ----------------------------------------------------------------------------------------------


def _expand(ndim: int, value) -> list[int]:
    if isinstance(value, int):
        return [value] * ndim
    out = [int(v) for v in value]
    assert len(out) == ndim, f"expected {ndim} values, got {value}"
    return out


def conv_output_shape(spatial_shape, ksize, stride, padding, dilation) -> list[int]:
    """spconv ``ops.get_conv_output_size``."""
    return [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(spatial_shape, ksize, stride, padding, dilation)
    ]


def deconv_output_shape(spatial_shape, ksize, stride, padding, dilation, output_padding) -> list[int]:
    """spconv ``ops.get_deconv_output_size``."""
    return [
        (s - 1) * st - 2 * p + k + op
        for s, k, st, p, d, op in zip(spatial_shape, ksize, stride, padding, dilation, output_padding)
    ]


def _linear_key(indices: Tensor, dims: Sequence[int], shift: Sequence[int] | None = None) -> Tensor:
    """(b, c0, c1, ...) -> ((b * D0 + c0 + s0) * D1 + c1 + s1) ... as int64."""
    idx = indices.long()
    key = idx[:, 0]
    for a, d in enumerate(dims):
        c = idx[:, a + 1]
        if shift is not None and shift[a]:
            c = c + shift[a]
        key = key * d + c
    return key


def _decode_key(key: Tensor, dims: Sequence[int]) -> Tensor:
    coords = []
    for d in reversed(dims):
        coords.append(key % d)
        key = key // d
    coords.append(key)
    return torch.stack(coords[::-1], dim=1).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# rulebook
# ----------------------------------------------------------------------------------------------


@dataclass
class Rulebook:
    """Neighbour pairs of one sparse conv layer.

    ``pairs_in[k]`` / ``pairs_out[k]`` (int64, equal length): input row ``pairs_in[k][j]`` feeds
    output row ``pairs_out[k][j]`` through kernel offset ``k`` (row-major over the kernel axes,
    spconv's order).  For SubM ``pairs_in[centre]`` is ``None`` (identity pairs).
    """

    subm: bool
    ksize: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    in_indices: Tensor
    out_indices: Tensor
    in_spatial_shape: list[int]
    out_spatial_shape: list[int]
    pairs_in: list[Optional[Tensor]]
    pairs_out: list[Optional[Tensor]]

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.ksize)

    def pair_counts(self) -> list[int]:
        n = self.in_indices.shape[0]
        return [n if p is None else int(p.shape[0]) for p in self.pairs_in]


def _merge_rank(site_keys: Tensor, query_keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``searchsorted`` by one sort (ONNX has no searchsorted): the site keys in sorted order,
    ``perm`` with ``sorted_keys = site_keys[perm]`` and, for every query, the number of site keys
    strictly below it (its left insertion point into ``sorted_keys``); also each site's own
    sorted position.  Returns ``(sorted_keys, perm, site_rank, query_rank)``.

    ``site_keys`` [N] unique and >= 0, ``query_keys`` [...] >= 0.  Queries sort before equal
    sites (tag 0 vs 1).  Every size stays a function of N (no boolean-mask selection)."""
    n = site_keys.shape[0]
    merged = torch.cat([site_keys * 2 + 1, query_keys.reshape(-1) * 2])
    svals, sperm = torch.sort(merged)
    is_site = svals % 2
    before = torch.cumsum(is_site, 0) - is_site
    rank = torch.empty_like(before).index_put_((sperm,), before)
    site_rank = rank[:n]  # sorted position of each site
    perm = torch.empty_like(site_rank).index_put_((site_rank,), torch.arange(n, device=site_keys.device))
    return site_keys[perm], perm, site_rank, rank[n:].view(query_keys.shape)


def subm_rulebook(
    indices: Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    ksize: Sequence[int],
    dilation: Sequence[int] | int = 1,
) -> Rulebook:
    """Pairs of a submanifold conv (output sites = input sites), equal to spconv's
    ``generate_subm_conv_inds_cpu`` as sets per kernel offset.  Like spconv, ``padding`` and
    ``stride`` of a SubM layer are ignored (the kernel is centred, odd sizes only)."""
    ndim = len(spatial_shape)
    ksize = _expand(ndim, ksize)
    dilation = _expand(ndim, dilation)
    assert all(k % 2 == 1 for k in ksize), "subm only supports odd kernel sizes"
    kv = math.prod(ksize)
    reach = [(k // 2) * d for k, d in zip(ksize, dilation)]
    dims = [s + 2 * r for s, r in zip(spatial_shape, reach)]
    # key weight of one step along each axis
    step = [math.prod(dims[a + 1:]) for a in range(ndim)]
    key = _linear_key(indices, dims, reach)

    # offsets k > centre (row-major) are looked up; k' = kv-1-k are the same pairs swapped.
    # A query per kernel "row" (all axes but the last) whose row index is above the centre row;
    # within a row the partners of consecutive dx are consecutive in key order (dilation 1).
    kx, dx_dil = ksize[-1], dilation[-1]
    row_shape = ksize[:-1]
    n_rows = math.prod(row_shape)
    centre_row = n_rows // 2

    def row_delta(row: int) -> int:
        delta, rem = 0, row
        for a in range(ndim - 2, -1, -1):
            r = rem % ksize[a]
            rem //= ksize[a]
            delta += (r - ksize[a] // 2) * dilation[a] * step[a]
        return delta

    # each query: (key delta of its first target, [(k, extra key delta of each chained target)])
    queries: list[tuple[int, list[tuple[int, int]]]] = []
    for row in range(centre_row + 1, n_rows):
        base = row_delta(row)
        ks = [(row * kx + ix, (ix - kx // 2) * dx_dil) for ix in range(kx)]
        if dx_dil == 1:
            queries.append((base + ks[0][1], [(k, d - ks[0][1]) for k, d in ks]))
        else:  # sites between the targets would break the chain: one query per offset
            queries.extend((base + d, [(k, 0)]) for k, d in ks)
    # centre row, dx > 0
    centre_x = [(centre_row * kx + ix, (ix - kx // 2) * dx_dil) for ix in range(kx // 2 + 1, kx)]
    if dx_dil != 1:
        queries.extend((d, [(k, 0)]) for k, d in centre_x)
        centre_x = []

    if queries:
        qdelta = torch.tensor([q[0] for q in queries], dtype=torch.int64, device=key.device)
        qkeys = key.unsqueeze(0) + qdelta.unsqueeze(1)
        skeys, perm, own_rank, qpos = _merge_rank(key, qkeys)
    else:
        skeys, perm, own_rank, qpos = _merge_rank(key, key[:0])
    # sorted keys with a sentinel that no target equals (targets are >= 0)
    skeys_pad = torch.cat([skeys, skeys.new_full((1,), -1)])

    pairs_in: list[Optional[Tensor]] = [None] * kv
    pairs_out: list[Optional[Tensor]] = [None] * kv

    def chain(at: Tensor, first_target: Tensor, members: list[tuple[int, int]]) -> None:
        for j, (k, extra) in enumerate(members):
            target = first_target + extra if extra else first_target
            found = skeys_pad.index_select(0, at) == target
            rows = found.nonzero().squeeze(1)  # this site (output of k)
            partner = perm.index_select(0, at.index_select(0, rows))  # its neighbour (input of k)
            pairs_out[k], pairs_in[k] = rows, partner
            pairs_out[kv - 1 - k], pairs_in[kv - 1 - k] = partner, rows
            if j + 1 < len(members):  # the next target's partner is one further if this one exists
                at = at + found.to(at.dtype)

    for q, (delta, members) in enumerate(queries):
        chain(qpos[q], key + delta, members)
    if centre_x:
        # own sorted rank + 1 is where the dx = +1 partner would be
        first_extra = centre_x[0][1]
        chain(own_rank + 1, key + first_extra, [(k, d - first_extra) for k, d in centre_x])

    return Rulebook(
        subm=True,
        ksize=ksize,
        stride=[1] * ndim,
        padding=reach,
        dilation=dilation,
        in_indices=indices,
        out_indices=indices,
        in_spatial_shape=list(spatial_shape),
        out_spatial_shape=list(spatial_shape),
        pairs_in=pairs_in,
        pairs_out=pairs_out,
    )


def _axis_candidates(
    indices: Tensor,
    out_shape: Sequence[int],
    ksize: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per axis a: output coordinate and validity of every (kernel tap r, input site i), [k_a, N].

    conv: o = (i + p - r*d) / s when divisible and 0 <= o < out; transposed: o = i*s - p + r*d
    (spconv ``ConvOutLocIter.query_npq`` / ``query_nhw_out``)."""
    coords, valids = [], []
    idx = indices.to(torch.int32)
    for a in range(len(out_shape)):
        c = idx[:, a + 1].unsqueeze(0)
        r = torch.arange(ksize[a], dtype=torch.int32, device=idx.device).unsqueeze(1) * dilation[a]
        if transposed:
            o = c * stride[a] - padding[a] + r
            ok = (o >= 0) & (o < out_shape[a])
        else:
            num = c + padding[a] - r
            ok = num >= 0
            num = num.clamp(min=0)  # floor and truncating division agree on non-negatives
            if stride[a] != 1:
                ok = ok & (num % stride[a] == 0)
                num = num // stride[a]
            o = num
            ok = ok & (o < out_shape[a])
        coords.append(o)
        valids.append(ok)
    return coords, valids


def conv_rulebook(
    indices: Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    ksize: Sequence[int],
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    output_padding: Sequence[int] | int = 0,
    transposed: bool = False,
) -> Rulebook:
    """Pairs and output sites of a regular (strided) or transposed sparse conv, with the output
    sites in spconv 2.3.8's CPU order (first appearance in a k-outer, i-inner scan)."""
    ndim = len(spatial_shape)
    ksize, stride = _expand(ndim, ksize), _expand(ndim, stride)
    padding, dilation = _expand(ndim, padding), _expand(ndim, dilation)
    output_padding = _expand(ndim, output_padding)
    if transposed:
        out_shape = deconv_output_shape(spatial_shape, ksize, stride, padding, dilation, output_padding)
    else:
        out_shape = conv_output_shape(spatial_shape, ksize, stride, padding, dilation)
    if any(s <= 0 for s in out_shape):
        raise ValueError(f"out spatial shape {out_shape} reaches zero (input {list(spatial_shape)})")
    kv = math.prod(ksize)
    n = indices.shape[0]

    coords, valids = _axis_candidates(indices, out_shape, ksize, stride, padding, dilation, transposed)
    valid = valids[0]
    for a in range(1, ndim):  # [k_0 * ... * k_a, N], kernel offsets row-major
        valid = (valid.unsqueeze(1) & valids[a].unsqueeze(0)).flatten(0, 1)
    # valid (k, i) in spconv's scan order (k outer, i inner), one nonzero per offset so that the
    # per-offset pair counts are the sizes of the pieces (no data-dependent slicing later)
    rows = [valid[k].nonzero().squeeze(1) for k in range(kv)]
    for r in rows:
        torch._check(r.shape[0] <= _MAX_SITES)
    cand_in = torch.cat(rows)
    taps = torch.cat([torch.full_like(r, k) for k, r in enumerate(rows)])
    # output key of each candidate from the per-axis tables: tap r_a of offset k, site i
    cand = indices[:, 0].long()[cand_in]
    rem = taps
    tap_of_axis = []
    for a in range(ndim - 1, -1, -1):
        tap_of_axis.append(rem % ksize[a])
        rem = rem // ksize[a]
    tap_of_axis.reverse()
    for a in range(ndim):
        o = coords[a].reshape(-1)[tap_of_axis[a] * n + cand_in]
        cand = cand * out_shape[a] + o.long()
    p = cand.shape[0]

    # first appearance of each unique key: sort key * (P + 1) + j (all distinct -> any sort is
    # exact); a stable sort of the keys instead if the composite could overflow int64
    out_volume = batch_size * math.prod(out_shape)
    in_volume = batch_size * math.prod(spatial_shape)
    j = torch.arange(p, device=cand.device)
    if out_volume * (kv * in_volume + 1) < _INT64_LIMIT:
        svals, sperm = torch.sort(cand * (p + 1) + j)
        skeys = svals // (p + 1)
    else:
        skeys, sperm = torch.sort(cand, stable=True)
    is_first = torch.ones_like(skeys, dtype=torch.bool)
    is_first[1:] = skeys[1:] != skeys[:-1]
    first_j = sperm[is_first]  # [M], groups in key order; smallest scan position of each key
    mark = torch.zeros_like(is_first).index_put_((first_j,), torch.ones_like(first_j, dtype=torch.bool))
    out_keys = cand[mark]  # [M] in first-appearance order (spconv's)
    m = out_keys.shape[0]
    if not isinstance(m, int):
        # traced: M is an unbacked size.  spconv (CUDA) raises when every site vanishes and
        # SparseSequential branches on ``indices.shape[0] != 0``; assert M >= 1 at run time
        torch._check(m >= 1, lambda: "sparse conv: no active output sites")
    rank_at_j = torch.cumsum(mark.to(torch.int64), 0) - 1
    group_out = rank_at_j[first_j]  # output row of each key group
    group_of_sorted = torch.cumsum(is_first.to(torch.int64), 0) - 1
    cand_out = torch.empty_like(cand).index_put_((sperm,), group_out[group_of_sorted])

    pairs_in: list[Optional[Tensor]] = list(rows)
    pairs_out: list[Optional[Tensor]] = list(torch.split(cand_out, [r.shape[0] for r in rows]))

    return Rulebook(
        subm=False,
        ksize=ksize,
        stride=stride,
        padding=padding,
        dilation=dilation,
        in_indices=indices,
        out_indices=_decode_key(out_keys, out_shape),
        in_spatial_shape=list(spatial_shape),
        out_spatial_shape=out_shape,
        pairs_in=pairs_in,
        pairs_out=pairs_out,
    )


# ----------------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------------


def kernel_weight(weight: Tensor, ksize: Sequence[int], layout: str = "KRSC") -> Tensor:
    """Weight as ``[K, C_in, C_out]`` (K row-major over the kernel axes).

    ``KRSC``: [out, *k, in] (spconv 2.x, every algo since 2.2, and mmdet3d checkpoints after its
    ``register_spconv2`` loader converted them); ``RSKC``: [*k, out, in] (spconv Native when
    ``ALL_WEIGHT_IS_KRSC`` is off); ``RSCK``: [*k, in, out] (mmcv.ops / spconv 1.x)."""
    kv, ndim = math.prod(ksize), len(ksize)
    if layout == "KRSC":
        return weight.reshape(weight.shape[0], kv, weight.shape[-1]).permute(1, 2, 0)
    if layout == "RSKC":
        return weight.reshape(kv, weight.shape[ndim], weight.shape[ndim + 1]).transpose(1, 2)
    if layout == "RSCK":
        return weight.reshape(kv, weight.shape[ndim], weight.shape[ndim + 1])
    raise ValueError(f"unknown weight layout {layout}")


def weight_layout(module) -> str:
    """Layout of ``module.weight`` as spconv 2.3.8 / mmcv allocate it."""
    if type(module).__module__.startswith("mmcv."):
        return "RSCK"
    try:
        from spconv.constants import ALL_WEIGHT_IS_KRSC
        from spconv.core import ConvAlgo
    except ImportError:  # pragma: no cover - spconv is a dependency
        return "KRSC"
    if ALL_WEIGHT_IS_KRSC or getattr(module, "algo", None) != ConvAlgo.Native:
        return "KRSC"
    return "RSKC"


def apply_rulebook(
    features: Tensor,
    weight: Tensor,
    rulebook: Rulebook,
    inverse: bool = False,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Gather - GEMM - scatter: ``out[pairs_out[k]] += features[pairs_in[k]] @ weight[k]``.

    ``weight`` is ``[K, C_in, C_out]`` (see ``kernel_weight``).  ``inverse`` runs the pairs
    backwards (output rows = the rulebook's input sites), as spconv's inverse conv does."""
    kv = weight.shape[0]
    if inverse:
        n_out = rulebook.in_indices.shape[0]
    else:
        n_out = rulebook.out_indices.shape[0]
    if rulebook.subm:
        out = features @ weight[kv // 2]
    else:
        out = features.new_zeros((n_out, weight.shape[2]))
    for k in range(kv):
        src, dst = rulebook.pairs_in[k], rulebook.pairs_out[k]
        if src is None:
            continue
        if inverse:
            src, dst = dst, src
        # within one offset every output row appears at most once: a plain (non-reducing) scatter
        # of out[dst] + contribution is exact and avoids ScatterND(reduction='add'), which
        # onnxruntime 1.32 runs with a thread race (microsoft/onnxruntime#18048)
        out = out.index_put((dst,), out.index_select(0, dst) + features.index_select(0, src) @ weight[k])
    if bias is not None:
        out = out + bias
    return out


# ----------------------------------------------------------------------------------------------
# spconv drop-in forwards
# ----------------------------------------------------------------------------------------------


def _activation(module, x: Tensor) -> Tensor:
    act = getattr(module, "act_type", None)
    if act is None:
        return x
    name = getattr(act, "name", str(act))
    if name.endswith("None_"):
        return x
    if name.endswith("ReLU") and not name.endswith("LeakyReLU"):
        return torch.relu(x)
    if name.endswith("LeakyReLU"):
        return torch.nn.functional.leaky_relu(x, module.act_alpha)
    if name.endswith("Sigmoid"):
        return torch.sigmoid(x)
    raise NotImplementedError(f"activation {act}")


def _cache_key(indice_key):
    return (RULEBOOK_TAG, indice_key)


def _out_tensor(x, features: Tensor, indices: Tensor, spatial_shape, indice_dict: dict):
    out = x.shadow_copy().replace_feature(features)
    out.indices = indices
    out.indice_dict = indice_dict
    out.spatial_shape = [int(s) for s in spatial_shape]
    return out


def sparse_conv_forward(self, input, add_input=None):
    """Forward of spconv's ``SparseConvolution`` (SubM, regular/strided, transposed and inverse
    layers; ``self.subm`` / ``self.inverse`` / ``self.transposed`` pick the kind).

    Takes and returns a spconv ``SparseConvTensor``; the output carries a copy of the input's
    ``indice_dict`` plus this layer's rulebook under ``(RULEBOOK_TAG, indice_key)``.  A fused
    ``act_type`` is applied once, after ``add_input`` if given."""
    x = input
    features = x.features
    assert features.shape[1] == self.in_channels, "channel size mismatch"
    ksize = list(self.kernel_size)
    kv = math.prod(ksize)
    spatial_shape = list(x.spatial_shape)

    if getattr(self, "conv1x1", False):
        # spconv 2.3.8 multiplies by the raw weight memory viewed as [in, out], whatever the
        # allocated layout (for KRSC that is not the transpose); reproduced as is.
        out_features = features @ self.weight.reshape(self.in_channels, self.out_channels)
        if self.bias is not None:
            out_features = out_features + self.bias
        out_shape = conv_output_shape(spatial_shape, ksize, self.stride, self.padding, self.dilation)
        out = _out_tensor(x, out_features, x.indices, out_shape, x.indice_dict)
        return _with_add_input(self, out, add_input)

    weight = kernel_weight(self.weight, ksize, weight_layout(self))
    indice_dict = dict(x.indice_dict)
    key = _cache_key(self.indice_key) if self.indice_key is not None else None
    cached = indice_dict.get(key) if key is not None else None

    if self.inverse:
        assert cached is not None, f"inverse conv needs the rulebook of indice_key {self.indice_key!r}"
        assert not cached.subm, "inverse conv can only be used with standard conv"
        if list(cached.ksize) != ksize:
            raise ValueError(f"inverse conv kernel {ksize} differs from its forward conv {cached.ksize}")
        if list(cached.out_spatial_shape) != spatial_shape:
            raise ValueError(
                f"inverse conv input spatial shape {spatial_shape} is not the forward output {cached.out_spatial_shape}"
            )
        rulebook = cached
        out_features = apply_rulebook(features, weight, rulebook, inverse=True, bias=self.bias)
        out_indices, out_shape = rulebook.in_indices, rulebook.in_spatial_shape
    else:
        if cached is not None:
            assert self.subm and cached.subm, "only SubM layers reuse an indice_key's pairs"
            if list(cached.ksize) != ksize or list(cached.dilation) != list(self.dilation):
                raise ValueError(f"subm layers with indice_key {self.indice_key!r} differ in kernel/dilation")
            if list(cached.in_spatial_shape) != spatial_shape:
                raise ValueError(f"subm layers with indice_key {self.indice_key!r} differ in spatial shape")
            rulebook = cached
        else:
            if self.subm:
                rulebook = subm_rulebook(x.indices, spatial_shape, x.batch_size, ksize, self.dilation)
            else:
                rulebook = conv_rulebook(
                    x.indices,
                    spatial_shape,
                    x.batch_size,
                    ksize,
                    self.stride,
                    self.padding,
                    self.dilation,
                    self.output_padding,
                    transposed=self.transposed,
                )
            if key is not None:
                assert key not in indice_dict, f"indice key {self.indice_key!r} already exists in this sparse tensor"
                indice_dict[key] = rulebook
        assert weight.shape[0] == kv
        out_features = apply_rulebook(features, weight, rulebook, bias=self.bias)
        out_indices, out_shape = rulebook.out_indices, rulebook.out_spatial_shape

    out = _out_tensor(x, out_features, out_indices, out_shape, indice_dict)
    return _with_add_input(self, out, add_input)


def _with_add_input(self, out, add_input):
    """``act(conv + add_input)`` (spconv's fused residual), or ``act(conv)``."""
    features = out.features if add_input is None else out.features + add_input.features
    return out.replace_feature(_activation(self, features))


def subm_conv3d_forward(self, x, add_input=None):
    """``SubMConv3d.forward``."""
    assert self.subm, "not a SubM layer"
    return sparse_conv_forward(self, x, add_input)


def sparse_conv3d_forward(self, x, add_input=None):
    """``SparseConv3d.forward`` (regular, strided)."""
    assert not self.subm and not self.inverse and not self.transposed, "not a regular sparse conv"
    return sparse_conv_forward(self, x, add_input)


def sparse_inverse_conv3d_forward(self, x, add_input=None):
    """``SparseInverseConv3d.forward``."""
    assert self.inverse, "not an inverse sparse conv"
    return sparse_conv_forward(self, x, add_input)


def to_dense(x, channels_first: bool = True) -> Tensor:
    """``SparseConvTensor.dense()``: features scattered to ``[B, C, *spatial]`` (or channels last)."""
    features = x.features
    shape = [int(s) for s in x.spatial_shape]
    flat = _linear_key(x.indices, shape)
    grid = features.new_zeros((x.batch_size * math.prod(shape), features.shape[1]))
    grid = grid.index_put((flat,), features)
    grid = grid.view(x.batch_size, *shape, features.shape[1])
    if not channels_first:
        return grid
    ndim = len(shape)
    return grid.permute(0, ndim + 1, *range(1, ndim + 1)).contiguous()


def dense_method(self, channels_first: bool = True) -> Tensor:
    return to_dense(self, channels_first)


@contextlib.contextmanager
def patch_spconv() -> Iterator[None]:
    """Run spconv's ``SparseConvolution.forward`` and ``SparseConvTensor.dense`` as the functions
    above inside the block (restored afterwards, also on error)."""
    from spconv.pytorch.conv import SparseConvolution
    from spconv.pytorch.core import SparseConvTensor

    saved = SparseConvolution.forward, SparseConvTensor.dense
    SparseConvolution.forward = sparse_conv_forward
    SparseConvTensor.dense = dense_method
    try:
        yield
    finally:
        SparseConvolution.forward, SparseConvTensor.dense = saved
