"""Voxel/pillar feature scatter onto a dense BEV canvas, batched and without Python loops.

``scatter_conv_to_bev`` also applies the backbone's first convolution to the scattered rows
directly: the canvas is almost empty (PointPillars KITTI: 3945 of 214272 pillars), so the
convolution of the rows is a small MatMul, a gather and sum for each output cell the rows reach,
and one scatter into the (4x smaller, stride 2) output, instead of a scatter into the full canvas,
a layout reorder of it and a dense conv that mostly multiplies zeros (onnxruntime, two threads:
34 ms of PointPillars KITTI's 265).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .voxel_slots import stable_partition


def scatter_to_bev(
    features: Tensor, coors: Tensor, batch_size: int, ny: int, nx: int, valid: Tensor | None = None
) -> Tensor:
    """Scatter per-voxel features ``[N, C]`` to a canvas ``[B, C, ny, nx]``.

    ``coors`` is ``[N, 4]`` (batch, z, y, x) as mmdet3d's voxelizer writes it; voxel coordinates
    are unique, so the index_put has no collisions and equals mmdet3d's per-sample loop
    (``PointPillarsScatter.forward_batch``).

    ``valid`` (``[N]`` bool, optional) marks the rows to scatter; the others (e.g. the padding
    rows of a fixed-shape dynamic-voxel encoder, whatever their coors) write the first valid
    row's features to that row's cell again, which leaves the canvas as if they were absent
    (all zeros to cell 0 when no row is valid). Not a dump row past the canvas: dropping it is
    a copy of the whole canvas (14 ms of PointPillars-DV's 456 in onnxruntime, one thread).
    Without ``valid`` every row is scattered.
    """
    coors = coors.long()
    flat = (coors[:, 0] * ny + coors[:, 2]) * nx + coors[:, 3]
    cells = batch_size * ny * nx
    if valid is not None:
        # the first valid row (row 0 if there is none); index_select, not flat[first]: indexing
        # with a 0-d tensor would read it as a Python int (a data-dependent symbol in the export)
        first = valid.to(torch.int64).argmax().reshape(1)
        any_valid = valid.any()
        again = flat.index_select(0, first)
        flat = torch.where(valid, flat, torch.where(any_valid, again, torch.zeros_like(again)))
        row = features.index_select(0, first)
        features = torch.where(valid[:, None], features, torch.where(any_valid, row, torch.zeros_like(row)))
    canvas = features.new_zeros(cells, features.shape[1])
    canvas = canvas.index_put((flat,), features)
    return canvas.view(batch_size, ny, nx, features.shape[1]).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class BevConv:
    """A convolution applied to the BEV canvas: ``weight`` ``[Co, C, kh, kw]`` (groups 1,
    dilation 1, zero padding), ``bias`` ``[Co]``."""

    weight: Tensor
    bias: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]

    def output_size(self, ny: int, nx: int) -> tuple[int, int]:
        kh, kw = self.weight.shape[2:]
        return (
            (ny + 2 * self.padding[0] - kh) // self.stride[0] + 1,
            (nx + 2 * self.padding[1] - kw) // self.stride[1] + 1,
        )


def _slots(position: Tensor, kernel: int, stride: int, padding: int, size: int) -> tuple[Tensor, Tensor]:
    """The output positions an input position (``[N, 1]``) reaches along one axis: output ``o``
    reads inputs ``o * stride - padding + k``, ``k < kernel``, so ``position`` reaches
    ``o = (position + padding - k) / stride`` for the taps ``k`` where that divides,
    ``k = (position + padding) % stride + stride * j``: ``ceil(kernel / stride)`` slots ``j``.
    Returns ``[N, slots]`` output positions and whether each is one (tap inside the kernel,
    position inside the output)."""
    slots = torch.arange(-(-kernel // stride), device=position.device).view(1, -1)
    tap = (position + padding) % stride + stride * slots
    out = torch.div(position + padding - tap, stride, rounding_mode="floor")
    return out, (tap < kernel) & (out >= 0) & (out < size)


def scatter_conv_to_bev(features: Tensor, coors: Tensor, batch_size: int, ny: int, nx: int, conv: BevConv) -> Tensor:
    """``conv`` applied to ``scatter_to_bev(features, coors, batch_size, ny, nx)``, returned
    channels-last ``[B, Ho, Wo, Co]``, computed from the rows instead of the canvas (every row
    must be a pillar: the dynamic-voxel scatter has a row per point and passes only its first
    ``M``, the pillars; on all its rows this cost more than the canvas, 294 -> 306 ms).

    1. Each row's features times every kernel tap: one MatMul ``[N + 1, C] x [C, kh*kw*Co]``
       (row ``N`` is zeros: the product of an empty input cell).
    2. A map of the input canvas, padded by the conv's padding, to row numbers (``N`` where
       empty).
    3. The output cells the rows reach (``_slots``), flagged on the output grid and listed once
       each, in grid order: a CumSum of the flags gives each its place (``U`` cells, an unbacked
       size; 17-20 % of the rows' slots on the shared frames, neighbouring pillars share cells).
    4. Each listed cell's full conv output: for its ``kh*kw`` input cells, the row there times
       the tap, gathered and summed, plus the bias.
    5. One ScatterND of those values (unique cells) into the output canvas, which starts as the
       bias.

    Not a scatter-add of per-row products: ``index_put(accumulate=True)`` exports to
    ``ScatterND(reduction='add')``, which races in onnxruntime with more than one thread (lost
    updates), and ``ScatterElements(add)`` alone took 12 ms on PointPillars KITTI (two threads);
    and not one scatter per tap: each copies the output canvas.
    """
    co, _, kh, kw = conv.weight.shape
    sy, sx = conv.stride
    py, px = conv.padding
    ho, wo = conv.output_size(ny, nx)
    n = features.shape[0]
    device = features.device
    coors = coors.long()
    b, y, x = coors[:, 0:1], coors[:, 2:3], coors[:, 3:4]
    # 1. products [(N + 1) * kh * kw, Co]
    rows = torch.cat([features, features.new_zeros(1, features.shape[1])])
    products = (rows @ conv.weight.permute(1, 2, 3, 0).reshape(-1, kh * kw * co)).reshape(-1, co)
    # 2. the input canvas padded by the conv's padding, to row numbers
    pad_y, pad_x = ny + 2 * py, nx + 2 * px
    cell = ((b * pad_y + y + py) * pad_x + x + px).reshape(n)
    row_of = torch.full((batch_size * pad_y * pad_x,), n, dtype=torch.int64, device=device)
    row_of = row_of.index_put((cell,), torch.arange(n, device=device))
    # 3. the output cells reached, once each (slots that reach none flag a cell past the grid)
    cells = batch_size * ho * wo
    oy, oky = _slots(y, kh, sy, py, ho)
    ox, okx = _slots(x, kw, sx, px, wo)
    reached = ((b[:, :, None] * ho + oy[:, :, None]) * wo + ox[:, None, :]).reshape(-1)
    reached = torch.where((oky[:, :, None] & okx[:, None, :]).reshape(-1), reached, cells)
    flag = torch.zeros(cells + 1, dtype=torch.int64, device=device)
    flag = flag.index_put((reached,), torch.ones_like(reached))[:cells]
    # the grid's cells, the reached ones first (in grid order)
    order, _, counts, _ = stable_partition(1 - flag, 2)
    u = counts[0].item()
    torch._check(u >= 0)
    torch._check(u <= cells)
    listed = order[:u]
    # 4. their values
    b = torch.div(listed, ho * wo, rounding_mode="floor")
    oy = torch.div(listed, wo, rounding_mode="floor") - b * ho
    ox = listed - torch.div(listed, wo, rounding_mode="floor") * wo
    first_input = ((b * pad_y + oy * sy) * pad_x + ox * sx).reshape(-1, 1)
    taps = torch.arange(kh, device=device).view(-1, 1) * pad_x + torch.arange(kw, device=device)
    row = row_of.index_select(0, (first_input + taps.reshape(1, -1)).reshape(-1)).view(-1, kh * kw)
    product = row * (kh * kw) + torch.arange(kh * kw, device=device)
    values = products.index_select(0, product.reshape(-1)).view(-1, kh * kw, co).sum(1) + conv.bias
    # 5. the output canvas
    canvas = conv.bias.to(features.dtype).view(1, co).expand(cells, co)
    return canvas.index_put((listed,), values).view(batch_size, ho, wo, co)
