"""Voxel/pillar feature scatter onto a dense BEV canvas, batched and without Python loops."""

from __future__ import annotations

import torch
from torch import Tensor


def scatter_to_bev(
    features: Tensor, coors: Tensor, batch_size: int, ny: int, nx: int, valid: Tensor | None = None
) -> Tensor:
    """Scatter per-voxel features ``[N, C]`` to a canvas ``[B, C, ny, nx]``.

    ``coors`` is ``[N, 4]`` (batch, z, y, x) as mmdet3d's voxelizer writes it; voxel coordinates
    are unique, so the index_put has no collisions and equals mmdet3d's per-sample loop
    (``PointPillarsScatter.forward_batch``).

    ``valid`` (``[N]`` bool, optional) marks the rows to scatter; the others (e.g. the padding
    rows of a fixed-shape dynamic-voxel encoder, whatever their coors) go to a dump row past the
    canvas that is dropped. Without it every row is scattered.
    """
    coors = coors.long()
    flat = (coors[:, 0] * ny + coors[:, 2]) * nx + coors[:, 3]
    cells = batch_size * ny * nx
    if valid is None:
        canvas = features.new_zeros(cells, features.shape[1])
        canvas = canvas.index_put((flat,), features)
    else:
        flat = torch.where(valid, flat, torch.full_like(flat, cells))
        canvas = features.new_zeros(cells + 1, features.shape[1])
        canvas = canvas.index_put((flat,), features)[:cells]
    return canvas.view(batch_size, ny, nx, features.shape[1]).permute(0, 3, 1, 2).contiguous()
