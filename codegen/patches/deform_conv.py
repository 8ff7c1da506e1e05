"""Patches for mmcv's deformable convolutions (CenterPoint's DCNSeparateHead, FCOS3D/PGD DCN backbones).

mmcv's ``DeformConv2dFunction`` / ``ModulatedDeformConv2dFunction`` allocate their output with
``new_empty`` and fill it in a compiled kernel: torch.export fails with "The tensor has a non-zero
number of elements, but its data is not allocated yet". The module forwards are replaced by the
same computation in tensor ops (``codegen/ops/deform_conv.py``, equal to mmcv's CPU kernel in
tests/ops/test_deform_conv.py). The registry names ``DCN`` (``DeformConv2dPack``) and ``DCNv2``
(``ModulatedDeformConv2dPack``) are what configs write; recipes add these patches when such a
component appears anywhere in the model config (``recipes.COMPONENT_PATCHES``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.deform_conv import deform_conv2d
from . import register

_WHY = "compiled kernel writing into new_empty output: opaque to torch.export and ONNX"


@register("dcn.plain", "mmcv.ops.deform_conv:DeformConv2d.forward", _WHY)
def deform_conv_forward(self, x: Tensor, offset: Tensor) -> Tensor:
    return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation, self.groups, self.deform_groups)


@register("dcn.pack", "mmcv.ops.deform_conv:DeformConv2dPack.forward", _WHY)
def deform_conv_pack_forward(self, x: Tensor) -> Tensor:
    return deform_conv_forward(self, x, self.conv_offset(x))


@register("dcnv2.plain", "mmcv.ops.modulated_deform_conv:ModulatedDeformConv2d.forward", _WHY)
def modulated_deform_conv_forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
    return deform_conv2d(
        x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.deform_groups, mask
    )


@register("dcnv2.pack", "mmcv.ops.modulated_deform_conv:ModulatedDeformConv2dPack.forward", _WHY)
def modulated_deform_conv_pack_forward(self, x: Tensor) -> Tensor:
    o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
    return modulated_deform_conv_forward(self, x, torch.cat((o1, o2), dim=1), torch.sigmoid(mask))
