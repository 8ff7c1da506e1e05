"""Deformable convolution (DCN v1 and modulated DCN v2) in pure torch: bilinear sampling by gather.

mmcv's ``deform_conv2d`` / ``modulated_deform_conv2d`` are autograd Functions around compiled
kernels that allocate their output with ``new_empty`` and fill it in C++: torch.export sees an
unallocated tensor ("data is not allocated yet") and ONNX has no such op. This is the same
computation in tensor ops, numerically equal to mmcv's CPU kernel up to float summation order:

* output position (h, w), kernel tap k = (i, j) samples the input at
  ``(h * stride - pad + i * dilation + dy_k, w * stride - pad + j * dilation + dx_k)``;
  the offsets come as ``[dy_0, dx_0, dy_1, dx_1, ...]`` per deformable group (mmcv's layout);
* bilinear interpolation of the four integer neighbours, a neighbour outside the image counting
  as zero (mmcv's ``deformable_im2col_bilinear``: a point at or beyond -1 / H is all zeros);
* DCN v2 multiplies each sample by its mask (already through the sigmoid);
* the sampled columns ``[B, C * K, H_out, W_out]`` (channel-major, tap-minor, as the weight is
  laid out) then meet the weight as a grouped 1x1 convolution.

Only gathers with in-range indices (out-of-image neighbours are clamped and weighted by 0): no
GridSample, no scatter, no data-dependent shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair


def deform_sample(x: Tensor, offset: Tensor, kernel_size, stride=1, padding=0, dilation=1, deform_groups: int = 1) -> Tensor:
    """Bilinearly sample ``x [B, C, H, W]`` at the deformed kernel taps: ``[B, C, K, Ho, Wo]``.

    ``offset`` is ``[B, deform_groups * 2 * K, Ho, Wo]``; channels ``c`` of ``x`` belong to
    deformable group ``c // (C / deform_groups)``.
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    b, c, h, w = x.shape
    ho, wo = offset.shape[-2:]
    k = kh * kw
    dtype, device = x.dtype, x.device
    off = offset.reshape(b, deform_groups, k, 2, ho, wo)
    # regular grid of each tap: [K, Ho, Wo]
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
    base_y = torch.arange(ho, device=device, dtype=dtype) * sh - ph
    base_x = torch.arange(wo, device=device, dtype=dtype) * sw - pw
    py = tap_y.view(k, 1, 1) + base_y.view(1, ho, 1) + off[:, :, :, 0]  # [B, G, K, Ho, Wo]
    px = tap_x.view(k, 1, 1) + base_x.view(1, 1, wo) + off[:, :, :, 1]
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    cg = c // deform_groups
    values = x.reshape(b, deform_groups, cg, h * w)
    out = None
    for yy, xx, weight in ((y0, x0, hy * hx), (y0, x0 + 1, hy * lx), (y0 + 1, x0, ly * hx), (y0 + 1, x0 + 1, ly * lx)):
        inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).to(torch.int64)  # [B, G, K, Ho, Wo]
        index = index.reshape(b, deform_groups, 1, k * ho * wo).expand(b, deform_groups, cg, k * ho * wo)
        picked = torch.gather(values, 3, index).view(b, deform_groups, cg, k, ho, wo)
        term = picked * (weight * inside.to(dtype)).unsqueeze(2)
        out = term if out is None else out + term
    return out.reshape(b, c, k, ho, wo)


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    deform_groups: int = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """mmcv's ``deform_conv2d`` (``mask=None``) and ``modulated_deform_conv2d`` (``mask`` given,
    ``[B, deform_groups * K, Ho, Wo]``) as tensor ops."""
    c_out, _, kh, kw = weight.shape
    b, c = x.shape[:2]
    ho, wo = offset.shape[-2:]  # the output size (from the offset conv: no integer division in the graph)
    cols = deform_sample(x, offset, (kh, kw), stride, padding, dilation, deform_groups)  # [B, C, K, Ho, Wo]
    if mask is not None:
        k = kh * kw
        m = mask.reshape(b, deform_groups, 1, k, ho, wo)
        cols = (cols.view(b, deform_groups, c // deform_groups, k, ho, wo) * m).view(b, c, k, ho, wo)
    cols = cols.reshape(b, c * kh * kw, ho, wo)
    return torch.nn.functional.conv2d(cols, weight.reshape(c_out, -1, 1, 1), bias, groups=groups)
