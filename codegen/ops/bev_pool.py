"""Pure-torch BEVFusion ``bev_pool`` (camera frustum features -> BEV grid), traceable by torch.export.

Public API
----------
``bev_pool(feats [N, C], coords [N, 4] int (x, y, z, batch), B, D, H, W) -> [B, C, D, H, W]``
    Equal to ``projects/BEVFusion/bevfusion/ops/bev_pool/bev_pool.py::bev_pool`` (the CUDA
    ``bev_pool_ext`` op): the sum of the features of all points with the same ``(batch, z, x, y)``
    written to ``out[batch, :, z, x, y]`` (``H`` is the x extent, ``W`` the y extent), zeros elsewhere.
    Rows whose coordinates are outside the grid are dropped (the CUDA op assumes there are none and
    would write out of bounds).

``lss_bev_pool(geom_feats [B, N, D, H, W, 3], x [B, N, D, H, W, C], xbound, ybound, zbound)
-> [B, C * nz, nx, ny]`` and the module ``LSSBevPool(xbound, ybound, zbound)``
    Equal to ``BaseViewTransform.bev_pool(geom_feats, x)`` of ``projects/BEVFusion/bevfusion/
    depth_lss.py`` (inherited by ``LSSTransform`` and ``BaseDepthTransform`` / ``DepthLSSTransform``)
    for a module built with those bounds: voxel indices ``.long()`` of
    ``(geom - (bx - dx / 2)) / dx`` in float32 (truncation toward zero, so values in ``(-1, 0)``
    land in cell 0, as in BEVFusion), points outside ``[0, nx)`` dropped, ``bev_pool``, then the z
    slices concatenated along channels (channel ``z * C + c``).  A patch can call
    ``lss_bev_pool(geom, x, self.xbound, self.ybound, self.zbound)`` instead of ``self.bev_pool``.

``gen_dx_bx(xbound, ybound, zbound) -> (dx, bx, nx)``: BEVFusion's, same float32/int64 rounding.

Summation order (what makes this bit-exact)
-------------------------------------------
BEVFusion sorts the kept points by ``rank`` (``argsort`` on CUDA: a radix sort, stable), so every
cell's interval lists its points in input order, and the kernel sums them sequentially in float32
starting from ``0``.  Here one ``scatter_add`` (``ScatterElements(reduction='add')``) accumulates the
points in input order into a zero buffer (dropped points go to a discarded dump row): the same
float32 additions in the same order, in eager and in onnxruntime.  No sort is needed at all.

Export notes: no ``index_put(accumulate=True)`` (ONNX ``ScatterND(reduction='add')`` races in
onnxruntime 1.32), no boolean-mask filtering (``x[kept]`` becomes routing to the dump row), no integer
floor division (the batch index is an expanded ``arange``).  ONNX ``ScatterElements`` needs indices
of the update's shape, so the exported graph materialises a ``[num_points, C]`` index. In
``model.onnx`` the graph form ``flatten_row_scatters`` runs the scatter on 1-D views with an int32
index ``cell * C + c`` (the same additions in the same order): for BEVFusion nuScenes (6 x 118 x 32
x 88 frustum points, C = 80) a 0.64 GB index instead of the exporter's 1.3 GB int64 one, and
onnxruntime's scatter, one thread, 7.1 s + 1.2 s for the index -> 1.9 s + 0.5 s.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["gen_dx_bx", "bev_pool", "lss_bev_pool", "LSSBevPool"]


def gen_dx_bx(xbound: Sequence[float], ybound: Sequence[float], zbound: Sequence[float]):
    """BEVFusion ``gen_dx_bx``: ``dx`` (cell size) and ``bx`` (first cell centre) float32 [3],
    ``nx`` int64 [3] (``(hi - lo) / step`` in Python floats, truncated like ``torch.LongTensor``)."""
    rows = [xbound, ybound, zbound]
    dx = torch.tensor([row[2] for row in rows], dtype=torch.float32)
    bx = torch.tensor([row[0] + row[2] / 2.0 for row in rows], dtype=torch.float32)
    nx = torch.tensor([int((row[1] - row[0]) / row[2]) for row in rows], dtype=torch.int64)
    return dx, bx, nx


def _pool(feats: Tensor, cell: Tensor, kept: Tensor, num_cells: int) -> Tensor:
    """``[num_cells, C]``: float sums of ``feats`` rows per ``cell`` in input order (rows not
    ``kept`` go to a dump row that is dropped)."""
    ch = feats.shape[1]
    target = torch.where(kept, cell, torch.full_like(cell, num_cells))
    out = feats.new_zeros(num_cells + 1, ch)
    return out.scatter_add(0, target[:, None].expand(target.shape[0], ch), feats)[:num_cells]


def bev_pool(feats: Tensor, coords: Tensor, B: int, D: int, H: int, W: int) -> Tensor:
    """Equal to BEVFusion's ``bev_pool(feats, coords, B, D, H, W)``: ``[B, C, D, H, W]`` with
    ``coords`` columns ``(x < H, y < W, z < D, batch < B)``."""
    if feats.shape[0] != coords.shape[0]:
        raise ValueError("feats and coords must have the same number of rows")
    B, D, H, W = int(B), int(D), int(H), int(W)  # BEVFusion passes 0-d tensors (self.nx[i])
    c = coords.to(torch.int64)
    x, y, z, b = c.unbind(1)
    kept = (x >= 0) & (x < H) & (y >= 0) & (y < W) & (z >= 0) & (z < D) & (b >= 0) & (b < B)
    cell = ((b * D + z) * H + x) * W + y
    out = _pool(feats, cell, kept, B * D * H * W)
    return out.reshape(B, D, H, W, feats.shape[1]).permute(0, 4, 1, 2, 3).contiguous()


def lss_bev_pool(
    geom_feats: Tensor,
    x: Tensor,
    xbound: Sequence[float],
    ybound: Sequence[float],
    zbound: Sequence[float],
) -> Tensor:
    """Equal to BEVFusion ``BaseViewTransform.bev_pool(geom_feats, x)`` of a view transform built
    with ``xbound, ybound, zbound``: ``[B, C * nz, nx, ny]``."""
    b, n, d, h, w, ch = x.shape
    rows = (xbound, ybound, zbound)
    nx0, nx1, nx2 = (int((row[1] - row[0]) / row[2]) for row in rows)  # == gen_dx_bx's nx
    dx, bx, _ = gen_dx_bx(*rows)
    dx, bx = dx.to(geom_feats.device), bx.to(geom_feats.device)
    # float32, same ops as BEVFusion: (geom - (bx - dx / 2.0)) / dx, then .long() (trunc to 0)
    g = ((geom_feats - (bx - dx / 2.0)) / dx).reshape(-1, 3)
    # trunc(v) in [0, nx)  <=>  -1 < v < nx  (also False for NaN / huge values, like .long())
    upper = torch.tensor([nx0, nx1, nx2], dtype=g.dtype, device=g.device)
    kept = ((g > -1) & (g < upper)).all(dim=1)
    idx = torch.where(kept[:, None], g, torch.zeros_like(g)).to(torch.int64)
    ix, iy, iz = idx.unbind(1)
    batch = torch.arange(b, device=x.device)[:, None].expand(b, n * d * h * w).reshape(-1)
    cell = ((batch * nx2 + iz) * nx0 + ix) * nx1 + iy
    out = _pool(x.reshape(-1, ch), cell, kept, b * nx2 * nx0 * nx1)
    # bev_pool -> [B, C, nz, nx, ny]; torch.cat(x.unbind(dim=2), 1) -> channel z * C + c
    return out.reshape(b, nx2, nx0, nx1, ch).permute(0, 1, 4, 2, 3).reshape(b, nx2 * ch, nx0, nx1)


class LSSBevPool(nn.Module):
    """``forward(geom_feats, x)`` = BEVFusion ``BaseViewTransform.bev_pool`` for these bounds."""

    def __init__(self, xbound: Sequence[float], ybound: Sequence[float], zbound: Sequence[float]):
        super().__init__()
        self.xbound, self.ybound, self.zbound = tuple(xbound), tuple(ybound), tuple(zbound)

    def forward(self, geom_feats: Tensor, x: Tensor) -> Tensor:
        return lss_bev_pool(geom_feats, x, self.xbound, self.ybound, self.zbound)

    def extra_repr(self) -> str:
        return f"xbound={self.xbound}, ybound={self.ybound}, zbound={self.zbound}"
