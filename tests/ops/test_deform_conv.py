"""codegen.ops.deform_conv against mmcv 2.1's CPU kernels (DCN v1 and modulated DCN v2), at the
feature sizes the zoo runs them on, and exported alone (PT2 reloaded + onnxruntime, two sizes).

The cases are CenterPoint's DCNSeparateHead (``DCN``, 64 -> 64 channels, groups 4, on the
128 x 128 BEV map of the 0.2 m pillar model) and DCNv2 layers of a ResNet-101 DCN backbone
(FCOS3D / PGD: 3x3, stride 1 in caffe style, stride 2 in pytorch style, on nuScenes image
features). Offsets are several pixels large, so taps land between pixels, outside the image
and across its border, which is where bilinear sampling is easiest to get wrong.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mmcv.ops import DeformConv2dPack, ModulatedDeformConv2dPack
from mmcv.ops import deform_conv2d as mmcv_deform_conv2d
from mmcv.ops import modulated_deform_conv2d as mmcv_modulated_deform_conv2d
from torch.export import Dim

from codegen import patches
from codegen.ops import native
from codegen.ops.deform_conv import deform_conv2d
from export_check import assert_exports, forbidden_onnx_ops

# (channels in, out, H, W, stride, padding, dilation, groups, deform groups)
CASES = {
    "centerpoint_dcn_head": (64, 64, 128, 128, 1, 1, 1, 4, 1),
    "resnet101_dcnv2_stride1": (128, 128, 116, 200, 1, 1, 1, 1, 1),
    "resnet101_dcnv2_stride2": (256, 256, 58, 100, 2, 1, 1, 1, 1),
    "dilated_deform_groups": (32, 48, 37, 53, 1, 2, 2, 2, 4),
    "deform_groups_one_conv_group": (32, 48, 37, 53, 1, 1, 1, 1, 4),  # the batched MatMul summed over groups
}


def _inputs(c_in, c_out, h, w, stride, pad, dil, groups, dg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho = (h + 2 * pad - (dil * 2 + 1)) // stride + 1
    wo = (w + 2 * pad - (dil * 2 + 1)) // stride + 1
    x = torch.randn(1, c_in, h, w, generator=g)
    offset = torch.randn(1, dg * 18, ho, wo, generator=g) * 4.0
    mask = torch.rand(1, dg * 9, ho, wo, generator=g)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=g) / (c_in // groups * 9) ** 0.5
    bias = torch.randn(c_out, generator=g)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mmcv_cpu(case):
    c_in, c_out, h, w, stride, pad, dil, groups, dg = CASES[case]
    x, offset, mask, weight, bias = _inputs(*CASES[case])
    # most offsets are more than 2 px: border taps land outside the image (zero padding branch)
    ho, wo = offset.shape[-2:]
    assert (offset.abs() > 2).float().mean() > 0.5
    ref = mmcv_deform_conv2d(x, offset, weight, stride, pad, dil, groups, dg)
    ours = deform_conv2d(x, offset, weight, None, stride, pad, dil, groups, dg)
    assert ours.shape == ref.shape == (1, c_out, ho, wo)
    assert (ours - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    ref = mmcv_modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg)
    ours = deform_conv2d(x, offset, weight, bias, stride, pad, dil, groups, dg, mask=mask)
    assert (ours - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("cls, name", [(DeformConv2dPack, "dcn.pack"), (ModulatedDeformConv2dPack, "dcnv2.pack")])
def test_patched_pack_modules_equal_mmcv(cls, name):
    """The registered patches replace the mmcv module forwards one for one (offset conv with
    random, non-zero weights: mmcv initialises it to zero, which would only test a plain conv)."""
    torch.manual_seed(0)
    module = cls(64, 64, kernel_size=3, padding=1, groups=4).eval()
    torch.nn.init.normal_(module.conv_offset.weight, std=0.05)
    torch.nn.init.normal_(module.conv_offset.bias, std=1.0)
    x = torch.randn(1, 64, 96, 80)
    with torch.no_grad():
        ref = module(x)
        with patches.applied((name,)):
            ours = module(x)
    assert (ours - ref).abs().max().item() < 1e-5


class _Modulated(torch.nn.Module):
    def __init__(self, weight, bias, stride, pad, dil, groups, dg):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.args = (stride, pad, dil, groups, dg)

    def forward(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, *self.args, mask=mask)


def test_export_alone(tmp_path):
    """PT2 and ONNX with dynamic height and width, run at two sizes: the PT2 in tensor ops (only
    gathers, no custom op left), the ONNX file one native ``DeformConv`` node (opset 19)."""
    c_in, c_out, _, _, stride, pad, dil, groups, dg = CASES["dilated_deform_groups"]
    small = _inputs(c_in, c_out, 37, 53, stride, pad, dil, groups, dg, seed=1)
    large = _inputs(c_in, c_out, 64, 45, stride, pad, dil, groups, dg, seed=2)
    module = _Modulated(small[3], small[4], stride, pad, dil, groups, dg)
    h, w = Dim("h", min=4), Dim("w", min=4)
    shapes = ({2: h, 3: w}, {2: h, 3: w}, {2: h, 3: w})
    program = assert_exports(module, [s[:3] for s in (small, large)], shapes, tmp_path, atol=1e-5)
    assert [e.onnx_op for e in native.used(program)] == ["DeformConv"]
    saved = torch.export.load(str(tmp_path / "op.pt2"))
    assert native.used(saved) == [] and "aten.index.Tensor" in str(saved.graph)
    model = onnx.load(str(tmp_path / "op.onnx"))
    assert [n.op_type for n in model.graph.node if n.op_type == "DeformConv"] == ["DeformConv"]
    assert {o.version for o in model.opset_import if o.domain == ""} == {19}
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_deform_conv_matches_mmcv_cpu(case, tmp_path):
    """``model.onnx``'s form: one ONNX ``DeformConv`` node, run by onnxruntime's CPU kernel, equals
    mmcv's kernels (v2 with mask and bias, v1 without either) in every case's layout (groups,
    deformable groups, stride, dilation)."""
    c_in, c_out, h, w, stride, pad, dil, groups, dg = CASES[case]
    x, offset, mask, weight, bias = _inputs(*CASES[case])
    modulated = _Modulated(weight, bias, stride, pad, dil, groups, dg)

    class Plain(torch.nn.Module):
        def forward(self, x, offset):
            return deform_conv2d(x, offset, weight, None, stride, pad, dil, groups, dg)

    refs = {
        "v2": mmcv_modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg),
        "v1": mmcv_deform_conv2d(x, offset, weight, stride, pad, dil, groups, dg),
    }
    for name, module, args in (("v2", modulated, (x, offset, mask)), ("v1", Plain(), (x, offset))):
        with torch.no_grad():
            program = torch.export.export(module.eval(), args, strict=False)
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(program, (), str(path), dynamo=True, opset_version=18, custom_translation_table=native.translation_table())
        model = onnx.load(str(path))
        assert native.require_opsets(model) == ["DeformConv"]
        assert [n.op_type for n in model.graph.node] == ["DeformConv"], name
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
        ref = refs[name].numpy()
        assert abs(session.run(None, feeds)[0] - ref).max() < 1e-5 * max(1.0, abs(ref).max()), name


# (channels in, out, H, W, stride, padding, dilation, groups, deform groups): a DCNv2 of the
# ResNet DCN stages, shrunk (K = 9 x 64 = 576 per output pixel), and CenterPoint's DCN head
# layout (4 convolution groups: a MatMul batched over them, K = 9 x 16)
IREE_CASES = {"resnet_dcnv2": (64, 64, 24, 40, 2, 1, 1, 1, 1), "centerpoint_dcn_head": (64, 64, 32, 32, 1, 1, 1, 4, 1)}


@pytest.mark.parametrize("case", sorted(IREE_CASES))
def test_iree_form_matches_mmcv_in_iree(case, tmp_path):
    """IREE's form (tensor ops: the four neighbours' stacked row indices, a zero row for
    neighbours outside the image) compiled by iree-compile equals mmcv's modulated DCN on two
    inputs. Its product over the samples counts as a MatMul over gathered rows when K >= 256,
    which then compiles without matmul data tiling (``codegen.iree.GATHERED_ROWS_MIN_K``: the
    pack fused into the sampling stored every sample element by element); the grouped head's
    narrow product keeps it, as does every product on a CPU without AVX-512 (convolutions through
    im2col)."""
    from codegen.graph_forms import gathered_row_matmuls
    from codegen.iree import GATHERED_ROWS_MIN_K, IM2COL_CONVS, MATMUL_DATA_TILING, compile_onnx, iree_onnx, iree_runtime
    from codegen.ops.forms import iree_forms

    c_in, c_out, h, w, stride, pad, dil, groups, dg = IREE_CASES[case]
    inputs = [_inputs(*IREE_CASES[case], seed=s) for s in (1, 2)]
    module = _Modulated(inputs[0][3], inputs[0][4], stride, pad, dil, groups, dg)
    with iree_forms():
        program = assert_exports(module, [i[:3] for i in inputs], None, tmp_path, atol=1e-4)
    assert native.used(program) == []  # no DeformConv node in IREE's graph
    iree_onnx(tmp_path / "op.onnx", tmp_path / "iree.onnx")
    wide = groups == 1  # K = 576 against 144
    assert gathered_row_matmuls(tmp_path / "iree.onnx", GATHERED_ROWS_MIN_K) == (0, 1 if wide else 0)  # static rows
    compiled = compile_onnx(tmp_path / "op.onnx", tmp_path / "dcn.vmfb")
    assert (MATMUL_DATA_TILING in compiled.flags) == (not wide or IM2COL_CONVS in compiled.flags)
    run = iree_runtime(tmp_path / "dcn.vmfb", ["x", "offset", "mask"], static={}).run
    weight, bias = module.weight.detach(), module.bias.detach()
    for x, offset, mask, *_ in inputs:
        ref = mmcv_modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg).numpy()
        got = np.asarray(run((x.numpy(), offset.numpy(), mask.numpy()))[0])
        assert got.shape == ref.shape
        assert abs(got - ref).max() < 1e-5 * max(1.0, abs(ref).max())
