"""Patches for spconv 2.x sparse convolution (SECOND, CenterPoint voxel, PartA2, ...)."""

from __future__ import annotations

from ..ops.sparse_conv import dense_method, sparse_conv_forward
from . import register

register(
    "spconv.conv",
    "spconv.pytorch.conv:SparseConvolution.forward",
    "compiled rulebook + gather/GEMM/scatter kernels: opaque to torch.export and ONNX",
)(sparse_conv_forward)

register(
    "spconv.dense",
    "spconv.pytorch.core:SparseConvTensor.dense",
    "scatter to the dense grid through a compiled kernel",
)(dense_method)
