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
* the sampled columns meet the weight as one batched MatMul (``deform_conv2d``).

Only gathers with in-range indices (an out-of-image neighbour reads a zero row put before the
image's rows): no GridSample, no scatter, no data-dependent shapes.  That is the form of eager
runs, PT2 and IREE exports; ``model.onnx`` holds one ONNX ``DeformConv`` node instead (opset 19,
onnxruntime's CPU kernel, 1.2-3x faster than these ops there: ``codegen.ops.native``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import native


def deform_sample(x: Tensor, offset: Tensor, kernel_size, stride=1, padding=0, dilation=1, deform_groups: int = 1, mask=None) -> Tensor:
    """Bilinearly sample ``x [B, C, H, W]`` at the deformed kernel taps: ``[B, G, Ho * Wo, K, C / G]``
    (pixel-major, tap, then the group's channels: the layout the weight contraction reads).

    ``offset`` is ``[B, G * 2 * K, Ho, Wo]`` (G = ``deform_groups``); channels ``c`` of ``x``
    belong to deformable group ``c // (C / G)``. ``mask`` (DCN v2, ``[B, G * K, Ho, Wo]``) scales
    each sample. Each neighbour is one Gather of whole channel rows from ``x`` as
    ``[B * G * (1 + H * W), C / G]``: no per-element index tensor (onnxruntime's Expand +
    GatherElements took 5 of PGD's 16 s).

    The four neighbours' row indices are stacked into one tensor and each Gather takes its slice
    of it: IREE then reads the index inside the gather's body, and MLIR's vectorizer copies whole
    rows with vector loads (an index that is the fused op's own operand counts as varying along
    the row: one scalar load per sample, as in ``sparse_conv.apply_rulebook``). One thread, 256
    channels at 58 x 100, the sampling dispatch: 46 -> 15 ms, its product compiled without data
    tiling (``codegen.iree.GATHERED_ROWS_MIN_K``; docs/iree.md).
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    b, c, h, w = x.shape
    ho, wo = offset.shape[-2:]
    k = kh * kw
    g = deform_groups
    cg = c // g
    dtype, device = x.dtype, x.device
    # contiguous: the sums below then have one layout in eager and in the exporter's fake-tensor
    # passes (SMOKE's 24 x 80 map: the permuted strides made their reshape a view there only)
    off = offset.reshape(b, g, k, 2, ho, wo).permute(0, 1, 4, 5, 3, 2).contiguous()  # [B, G, Ho, Wo, 2, K]
    # regular grid of each tap, broadcast (no repeats of the dynamic sizes)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
    base_y = torch.arange(ho, device=device, dtype=dtype) * sh - ph
    base_x = torch.arange(wo, device=device, dtype=dtype) * sw - pw
    py = (base_y.view(ho, 1, 1) + tap_y + off[..., 0, :]).reshape(b, g, ho * wo, k)  # [B, G, Ho*Wo, K]
    px = (base_x.view(1, wo, 1) + tap_x + off[..., 1, :]).reshape(b, g, ho * wo, k)
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    scale = None if mask is None else mask.reshape(b, g, k, ho, wo).permute(0, 1, 3, 4, 2).reshape(b, g, ho * wo, k)
    # a zero row before each image's rows of channels, one per pixel ([B * G * (1 + H * W), C / G]):
    # a neighbour outside the image reads the zero row (no clamp, no 0/1 weight). The Concat also
    # writes the rows out channels-last in IREE: a transposed view is fused into the gathers there,
    # which then read x channel by channel, one scalar load per sample (docs/iree.md)
    rows = torch.cat((x.new_zeros(b * g, 1, cg), x.reshape(b * g, cg, h * w).transpose(1, 2)), 1).reshape(-1, cg)
    first = (torch.arange(b * g, device=device, dtype=torch.int64) * (h * w + 1)).view(b, g, 1, 1)
    corners = ((y0, x0, hy * hx), (y0, x0 + 1, hy * lx), (y0 + 1, x0, ly * hx), (y0 + 1, x0 + 1, ly * lx))
    indices, weights = [], []
    for yy, xx, weight in corners:
        inside = (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        indices.append(torch.where(inside, yy * w + xx + 1, 0.0).to(torch.int64) + first)  # [B, G, Ho*Wo, K]
        weights.append(weight if scale is None else weight * scale)
    index = torch.stack(indices)
    out = None
    for n in range(4):
        term = rows[index[n]] * weights[n].unsqueeze(-1)  # [B, G, Ho*Wo, K, C/G]
        out = term if out is None else out + term
    return out


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
    ``[B, deform_groups * K, Ho, Wo]``) as tensor ops: the samples ``[B, G, Ho*Wo, K * C/G]``
    meet the weight, regrouped to ``[G, K * C/G, C_out]``, in one batched MatMul summed over the
    deformable groups, a plain 2-D MatMul for one group (convolution ``groups`` > 1: a MatMul
    batched over them).  Exporting in onnxruntime's forms: one ONNX ``DeformConv`` node."""
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    if native.native_exporting():  # codegen.ops.native
        return torch.ops.mmdet3d_export.deform_conv2d(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups)
    return _decomposition(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups)


def _decomposition(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups) -> Tensor:
    """The tensor-op form (the custom op's decomposition: ``deform_conv2d``'s arguments in the op's order)."""
    c_out, _, kh, kw = weight.shape
    b, c = x.shape[:2]
    ho, wo = offset.shape[-2:]  # the output size (from the offset conv: no integer division in the graph)
    k = kh * kw
    g = deform_groups
    cols = deform_sample(x, offset, (kh, kw), stride, padding, dilation, g, mask)  # [B, G, Ho*Wo, K, C/G]
    if groups == 1:
        w = weight.reshape(c_out, g, c // g, k).permute(1, 3, 2, 0).reshape(g, k * (c // g), c_out)
        if g == 1:  # one plain GEMM, no sum over the groups: onnxruntime 71 ms against 83 (PGD's 5800 x 2304 x 256)
            out = torch.matmul(cols.reshape(-1, k * c), w[0]).reshape(b, ho * wo, c_out)
        else:
            out = torch.matmul(cols.reshape(b, g, ho * wo, k * (c // g)), w).sum(1)  # [B, Ho*Wo, C_out]
        if bias is not None:
            out = out + bias
        return out.transpose(1, 2).reshape(b, c_out, ho, wo)
    # convolution groups: one batched MatMul over them, [B, groups, Ho*Wo, K * C/groups] x [groups,
    # K * C/groups, C_out/groups]. IREE writes each sample's channels of a group as one vector
    # (CenterPoint's DCN head, 64 channels in 4 groups at 128 x 128: 35 -> 32 ms against a
    # grouped 1x1 Conv over channel-major columns, whose store transposes every sample)
    cg, og = c // groups, c_out // groups
    cols = cols.permute(0, 2, 3, 1, 4).reshape(b, ho * wo, k, groups, cg)  # channels in x's order
    lhs = cols.permute(0, 3, 1, 2, 4).reshape(b, groups, ho * wo, k * cg)
    w = weight.reshape(groups, og, cg, k).permute(0, 3, 2, 1).reshape(groups, k * cg, og)
    out = torch.matmul(lhs, w)  # [B, groups, Ho*Wo, C_out/groups]
    if bias is not None:
        out = out + bias.reshape(groups, 1, og)
    return out.transpose(2, 3).reshape(b, c_out, ho, wo)


# ---------------------------------------------------------------------------------------------
# the native form: ONNX DeformConv (opset 19)


@torch.library.custom_op(f"{native.NAMESPACE}::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    deform_groups: int,
) -> Tensor:
    return _decomposition(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups)


@_deform_conv2d_op.register_fake
def _(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups):
    return x.new_empty((x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _translation(x, offset, weight, bias, mask, stride, padding, dilation, groups, deform_groups):
    # ONNX's offset layout is mmcv's ([dy, dx] per deformable group and tap); an absent mask is 1
    import onnxscript

    return onnxscript.values.Opset("", 19).DeformConv(
        x,
        weight,
        offset,
        bias,
        mask,
        kernel_shape=list(weight.shape[2:]),
        strides=stride,
        pads=[padding[0], padding[1], padding[0], padding[1]],
        dilations=dilation,
        group=groups,
        offset_group=deform_groups,
    )


native.register(native.NativeOp(torch.ops.mmdet3d_export.deform_conv2d.default, "DeformConv", 19, _translation, _decomposition))
