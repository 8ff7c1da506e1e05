"""IREE target: ``--format iree`` compiles model.onnx into model.vmfb (llvm-cpu) and validates it
against the eager model like every other format; the graph forms (``codegen/graph_forms.py``,
in model.onnx and IREE's copy) are the same functions; static shapes pad exactly. docs/iree.md
has the measurements."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from codegen.errors import ExportError
from codegen.graph_forms import WINOGRAD_POINTS, WINOGRAD_TILE, cpu_forms, winograd_matrices
from codegen.iree import PADDINGS, compile_onnx, host_isa, iree_onnx, iree_runtime, pad_inputs, padding_rule
from codegen.metadata import parse_formats
from conftest import CONFIG, REPO, cli, frame_path

# ------------------------------------------------------------------ formats


def test_format_spec():
    assert parse_formats("both") == ("pt2", "onnx")
    assert parse_formats("iree") == ("iree",)  # compiled from its own ONNX export, model.iree.onnx
    assert parse_formats("all") == ("pt2", "onnx", "iree")
    assert parse_formats("iree,pt2") == ("pt2", "iree")
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        parse_formats("onnx,tflite")


def test_bad_format_is_one_error_line():
    proc = cli("--config", CONFIG, "--format", "vmfb", "--device", "cpu")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "mmdet3d-export: error: argument --format: unknown format 'vmfb' in --format vmfb "
        "(choose from pt2, onnx, iree, both, all, or a comma list)"
    ]
    proc = cli("--config", CONFIG, "--format", "onnx", "--iree-static", "5000", "--device", "cpu")
    assert proc.returncode == 2  # before any work: nothing generated
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
        "error: --iree-static needs --format iree (or all, or a list with iree)"
    ]


# ------------------------------------------------------------------ graph forms


def _save(graph, path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def _forms(tmp_path, graph, winograd: bool = False, conv_tiling: bool = False) -> tuple[list[str], list[str]]:
    """``graph`` saved as model.onnx and put through the forms (``iree_onnx``; ``winograd`` and
    ``conv_tiling`` as the ``host`` preset's data tiling asks) into iree.onnx: what was rewritten
    and the rewritten graph's op types."""
    _save(graph, tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx", winograd=winograd, conv_tiling=conv_tiling).rewrites
    return rewrites, [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]


def _vmfb_run(tmp_path, feeds) -> list:
    """The compiled ``model.vmfb`` of ``tmp_path`` run on ``feeds``."""
    return list(iree_runtime(tmp_path / "model.vmfb", list(feeds), static={}).run(tuple(feeds.values())))


def _iree_run(tmp_path, feeds) -> list:
    """model.onnx of ``tmp_path`` compiled (``host`` preset) and run on ``feeds``."""
    compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb")
    return _vmfb_run(tmp_path, feeds)


def _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol: float) -> None:
    """IREE's copy (``iree.onnx``) in onnxruntime and the compiled ``model.vmfb`` in IREE both give
    ``expected`` on ``feeds`` (rtol 1e-5)."""
    for got in (ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds), _vmfb_run(tmp_path, feeds)):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


def _secondfpn_like(path, seed=0):
    """SECONDFPN + Anchor3DHead in miniature: three ConvTranspose upsamplings (kernel = stride,
    with bias) of three scales, ReLU, a channel Concat read by three 1x1 Convs; plus a
    ConvTranspose whose kernel is not its stride (must be left alone)."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {
        "w0": f32(8, 6, 1, 1), "b0": f32(6),
        "w1": f32(8, 6, 2, 2), "b1": f32(6),
        "w2": f32(8, 6, 4, 4), "b2": f32(6),
        "wc": f32(2, 18, 1, 1), "bc": f32(2),
        "wr": f32(7, 18, 1, 1), "br": f32(7),
        "wd": f32(4, 18, 1, 1),
        "wx": f32(8, 3, 3, 3),
    }  # fmt: skip
    nodes = [
        helper.make_node("ConvTranspose", ["x0", "w0", "b0"], ["u0"], kernel_shape=[1, 1], strides=[1, 1]),
        helper.make_node("ConvTranspose", ["x1", "w1", "b1"], ["u1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["x2", "w2", "b2"], ["u2"], kernel_shape=[4, 4], strides=[4, 4]),
        *[helper.make_node("Relu", [f"u{i}"], [f"r{i}"]) for i in range(3)],
        helper.make_node("Concat", ["r0", "r1", "r2"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["cls"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["cat", "wr", "br"], ["reg"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["cat", "wd"], ["dir"], kernel_shape=[1, 1]),
        helper.make_node("ConvTranspose", ["x1", "wx"], ["other"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    shapes = {"x0": [1, 8, 12, 8], "x1": [1, 8, 6, 4], "x2": [1, 8, 3, 2]}  # all upsampled to 12 x 8
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("cls", "reg", "dir", "other")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    _save(graph, path)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def test_graph_forms_compute_the_same_function(tmp_path):
    """The rewritten graph (what IREE compiles) equals the exported one in onnxruntime."""
    feeds = _secondfpn_like(tmp_path / "model.onnx")
    form = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx")
    rewrites, function = form.rewrites, form.function
    assert function == "main_graph"
    assert len(rewrites) == 4, rewrites  # three deconvolutions and the concatenated head
    rewritten = onnx.load(str(tmp_path / "iree.onnx"))
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("ConvTranspose") == 1  # the 3x3 / stride-2 one is not a pixel shuffle
    assert "Concat" not in ops and ops.count("Split") == 1
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)
    for b, a in zip(before, after):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_onnxruntime_takes_the_deconvolutions_as_pointwise_convs(tmp_path):
    """model.onnx's own form (``onnxruntime_forms``, after ``cpu_forms``): each deconvolution
    MatMul is a 1x1 Conv with its output channels in DepthToSpace's DCR order, the heads taken
    before the shuffle are grouped 1x1 Convs (one group per kernel position, output channels padded
    to 16 where there is more than one group) + DepthToSpace, and a shuffled result read by a ReLU
    takes it before the shuffle; no MatMul or 6-D Transpose is left and the function is the same."""
    from codegen.graph_forms import onnxruntime_forms

    feeds = _secondfpn_like(tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    neutral = cpu_forms(model)
    assert sum("as MatMul + pixel shuffle" in r for r in neutral) == 3
    own = onnxruntime_forms(model)
    assert [r.split(" (")[1:] for r in own] == [
        ["8->6, 1x1) as a 1x1 Conv + DepthToSpace for onnxruntime", "1 head(s) as grouped 1x1 Convs before the shuffle)"],
        ["8->6, 2x2) as a 1x1 Conv + DepthToSpace for onnxruntime", "1 head(s) as grouped 1x1 Convs before the shuffle)"],
        ["8->6, 4x4) as a 1x1 Conv + DepthToSpace for onnxruntime", "1 head(s) as grouped 1x1 Convs before the shuffle)"],
    ]
    onnx.save(model, str(tmp_path / "ort.onnx"))
    nodes = model.graph.node
    ops = [n.op_type for n in nodes]
    assert "MatMul" not in ops and ops.count("DepthToSpace") == 2 and ops.count("ConvTranspose") == 1
    groups = sorted(helper.get_attribute_value(a) for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    assert groups == [1, 4, 16]  # the heads of the 1x1, 2x2 and 4x4 deconvolutions
    assert not any(n.op_type == "Transpose" and len(helper.get_attribute_value(n.attribute[0])) == 6 for n in nodes)
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    after = ort.InferenceSession(str(tmp_path / "ort.onnx")).run(None, feeds)
    for b, a in zip(before, after):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # CenterPoint's neck: the shuffled result read by a ReLU (then a 3x3 Conv)
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((8, 6, 2, 2)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
             "k": rng.standard_normal((5, 6, 3, 3)).astype(np.float32)}  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["u"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Relu", ["u"], ["r"]),
            helper.make_node("Conv", ["r", "k"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        ],
        "neck",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    _save(graph, tmp_path / "neck.onnx")
    model = onnx.load(str(tmp_path / "neck.onnx"))
    cpu_forms(model)
    assert onnxruntime_forms(model) == ["deconvolution MatMul u_form_mm (8->6, 2x2) as a 1x1 Conv + DepthToSpace for onnxruntime"]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "DepthToSpace", "Conv"]
    onnx.save(model, str(tmp_path / "neck_ort.onnx"))
    x = {"x": rng.standard_normal((1, 8, 5, 7)).astype(np.float32)}
    before = ort.InferenceSession(str(tmp_path / "neck.onnx")).run(None, x)[0]
    after = ort.InferenceSession(str(tmp_path / "neck_ort.onnx")).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def _runs_as_before(tmp_path, model, feeds) -> list[tuple[str, str]]:
    """``model``, rewritten from ``tmp_path / "model.onnx"``, saved as ort.onnx: onnxruntime gives
    the original's outputs; returns (domain, op_type) of the nodes of its optimised graph."""
    onnx.save(model, str(tmp_path / "ort.onnx"))
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort.optimised.onnx")
    after = ort.InferenceSession(str(tmp_path / "ort.onnx"), options).run(None, feeds)
    for b, a in zip(before, after):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    return [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "ort.optimised.onnx")).graph.node]


def test_onnxruntime_takes_narrow_convs_as_shifted_pointwise_convs(tmp_path):
    """model.onnx's form of CenterPoint's last head convolutions (3x3, 64 -> 1-3 channels, which
    onnxruntime pads to 16 output channels): a 1x1 Conv to every (tap, output) pair, a depthwise
    Conv whose one-hot kernels shift each by its tap (the original pads, here uneven), and a 1x1
    Conv summing the taps plus the bias. onnxruntime runs all three blocked (NCHWc) and the
    outputs are the same; wider outputs, fewer or odd input channels and strided convs stay."""
    from codegen.graph_forms import onnxruntime_forms

    rng = np.random.default_rng(3)
    inits = {
        "w2": rng.standard_normal((2, 64, 3, 3)), "b2": rng.standard_normal(2),
        "w1": rng.standard_normal((1, 64, 3, 3)),  # no bias
        "w3": rng.standard_normal((3, 64, 3, 3)), "b3": rng.standard_normal(3),
        "w4": rng.standard_normal((4, 64, 3, 3)),  # 4 outputs: stays
        "w_narrow": rng.standard_normal((2, 16, 3, 3)),  # 16 inputs: stays
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w2", "b2"], ["y2"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[0, 1, 2, 1]),
        helper.make_node("Conv", ["x", "w3", "b3"], ["y3"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w3", "b3"], ["y3s"], pads=[1, 1, 1, 1], strides=[2, 2]),  # strided: stays
        helper.make_node("Conv", ["x", "w4"], ["y4"], pads=[1, 1, 1, 1]),
        helper.make_node("Slice", ["x", "zero", "sixteen", "one"], ["x16"]),
        helper.make_node("Conv", ["x16", "w_narrow"], ["yn"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 13, 10])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y2", "y1", "y3", "y3s", "y4", "yn")],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("zero", 0), ("sixteen", 16), ("one", 1))],
    )
    _save(graph, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    model = onnx.shape_inference.infer_shapes(model)
    form = "as pointwise taps + depthwise shifts + a summing Conv for onnxruntime"
    assert onnxruntime_forms(model) == [f"Conv {y} (3x3, 64 -> {c} channels) {form}" for y, c in (("y2", 2), ("y1", 1), ("y3", 3))]
    groups = [helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert sorted(groups) == [16, 32, 32]  # the taps' 9-27 channels padded to NCHWc's 16
    ran = _runs_as_before(tmp_path, model, {"x": rng.standard_normal((1, 64, 13, 10)).astype(np.float32)})
    ran = [op for op in ran if op[1] == "Conv"]
    assert ran == [("com.microsoft.nchwc", "Conv")] * (3 * 3 + 3)  # all blocked, the three forms' too


def test_onnxruntime_takes_concat_convs_as_partial_sums(tmp_path):
    """model.onnx's form of a channel Concat read only by convolutions (SSN's, CenterPoint's and
    BEVFusion's shared convs over SECONDFPN's output): one Conv per concatenated part, summed;
    onnxruntime fuses the Adds into the blocked Convs (no Concat, no Add left in its optimised
    graph) and the outputs are the same. A Concat with another reader stays."""
    from codegen.graph_forms import onnxruntime_forms

    rng = np.random.default_rng(4)
    inits = {
        "w": rng.standard_normal((24, 48, 3, 3)), "b": rng.standard_normal(24),
        "w_strided": rng.standard_normal((8, 48, 3, 3)),
        "w_other": rng.standard_normal((8, 48, 1, 1)),
    }  # fmt: skip
    nodes = [
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Concat", ["ra", "c"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["y"]),
        helper.make_node("Conv", ["cat", "w_strided"], ["y_strided"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Concat", ["a", "c"], ["cat_kept"], axis=1),
        helper.make_node("Conv", ["cat_kept", "w_other"], ["y_other"]),
        helper.make_node("Sigmoid", ["cat_kept"], ["y_kept"]),
    ]
    graph = helper.make_graph(
        nodes,
        "neck",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 12, 10]) for x, c in (("a", 16), ("c", 32))],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y", "y_strided", "y_other", "y_kept")],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    _save(graph, tmp_path / "model.onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "model.onnx")))
    assert onnxruntime_forms(model) == ["Concat cat (16 + 32 channels) read by 2 Conv(s) as partial Convs summed, for onnxruntime"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Concat") == 1 and ops.count("Conv") == 5 and ops.count("Add") == 2
    feeds = {x: rng.standard_normal((1, c, 12, 10)).astype(np.float32) for x, c in (("a", 16), ("c", 32))}
    ran = _runs_as_before(tmp_path, model, feeds)
    assert ("", "Add") not in ran and ran.count(("com.microsoft.nchwc", "Conv")) == 5 and ran.count(("", "Concat")) == 1


def test_constant_castlike_folds_so_the_conv_runs_blocked(tmp_path):
    """A bias-free Conv + BatchNorm as torch exports it when the ONNX optimiser is skipped (large
    graphs): the zero bias is ``Expand(CastLike(0, x), Shape(w)[:1])``, which onnxruntime cannot
    fold (CastLike reads x), so it neither fuses the BatchNorm nor moves the Conv to its
    NCHWc kernels. The CastLike becomes a constant; onnxruntime's optimised graph then has a
    NCHWc Conv and no BatchNormalization, and the outputs are the same."""
    rng = np.random.default_rng(8)
    inits = {
        "w": rng.standard_normal((16, 16, 3, 3)).astype(np.float32),
        "one": np.array([1], np.int64),
        "scale": rng.uniform(0.5, 2, 16).astype(np.float32),
        "shift": rng.standard_normal(16).astype(np.float32),
        "mean": rng.standard_normal(16).astype(np.float32),
        "var": rng.uniform(0.5, 2, 16).astype(np.float32),
    }
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Shape", ["w"], ["out_channels"], end=1),
        helper.make_node("Expand", ["out_channels", "one"], ["bias_shape"]),
        helper.make_node("Expand", ["zero_like", "bias_shape"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert rewrites == ["1 CastLike of constants and 3 constant shape ops as initializers"]
    assert "CastLike" not in ops and "Constant" not in ops
    feeds = {"x": rng.standard_normal((1, 16, 12, 10)).astype(np.float32)}
    optimised = {}
    for name in ("model", "iree"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.ort.onnx")
        optimised[name] = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), options).run(None, feeds)[0]
    np.testing.assert_allclose(optimised["iree"], optimised["model"], rtol=1e-5, atol=1e-5)
    ran = {name: [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / f"{name}.ort.onnx")).graph.node] for name in ("model", "iree")}
    assert ("com.microsoft.nchwc", "Conv") not in ran["model"] and ("", "BatchNormalization") in ran["model"]
    assert ("com.microsoft.nchwc", "Conv") in ran["iree"] and ("", "BatchNormalization") not in ran["iree"]


def test_castlike_of_a_fill_becomes_a_fill_of_the_target_type(tmp_path):
    """``new_zeros`` of a canvas as torch exports it, ``CastLike(ConstantOfShape(shape), x)``: a
    float canvas filled in its own type (no cast of the whole buffer per run), same values; a
    fill read by another node too stays for that reader."""
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["fill"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("CastLike", ["fill", "x"], ["canvas"]),
        helper.make_node("ScatterElements", ["canvas", "idx", "x"], ["y"], axis=1),
        helper.make_node("Cast", ["fill"], ["n"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]), helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "n")],
        [numpy_helper.from_array(np.array([3, 9], np.int64), "shape")],
    )
    _save(graph, tmp_path / "model.onnx")
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "idx": np.stack([rng.permutation(9)[:4] for _ in range(3)])}
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    rewrites, ops = _forms(tmp_path, graph)
    assert rewrites == ["1 CastLike of ConstantOfShape as fills of the target type"]
    assert "CastLike" not in ops and ops.count("ConstantOfShape") == 2
    after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)
    assert (before[0] == 2).sum() == 15 and before[0].dtype == after[0].dtype == np.float32
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_identity_transposes_become_identities(tmp_path):
    """``Transpose(perm=[0, 1])`` (one per index_put in the unoptimised large exports) copies the
    tensor in onnxruntime; as an Identity it is dropped. A real permutation stays."""
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["same"], perm=[0, 1]),
            helper.make_node("Transpose", ["same"], ["y"], perm=[1, 0]),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert rewrites == ["1 identity Transposes as Identity"]
    assert ops == ["Identity", "Transpose"]
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, {"x": x})[0], x.T)


def test_pfn_batchnorm_folds_into_its_matmul(tmp_path):
    """PFNLayer in miniature: bias-free linear, BatchNorm1d over the permuted channels, ReLU.
    The BatchNorm and both transposes go (folded into the MatMul's weight and an Add); the
    function is the same, also when the linear layer is a sum of MatMuls (a split VFE layer).
    A BatchNorm whose input has a second reader is left alone."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"),
        helper.make_node("Transpose", ["h"], ["t"], perm=[0, 2, 1]),
        helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3, name="norm"),
        helper.make_node("Transpose", ["bn"], ["u"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["u"], ["y"]),
    ]
    inits = {
        "w": rng.standard_normal((10, 8)).astype(np.float32),
        "gamma": rng.uniform(0.5, 2, 8).astype(np.float32),
        "beta": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": rng.uniform(0.1, 3, 8).astype(np.float32),
    }
    split = [  # split_concat_matmuls' form of a VFE layer: the linear layer as a sum of MatMuls
        helper.make_node("MatMul", ["x", "wa"], ["ha"], name="part0"),
        helper.make_node("MatMul", ["x", "wb"], ["hb"], name="part1"),
        helper.make_node("Add", ["ha", "hb"], ["h"]),
    ]
    inits |= {"wa": rng.standard_normal((10, 8)).astype(np.float32), "wb": rng.standard_normal((10, 8)).astype(np.float32)}
    for extra, folded in ((False, True), (True, False), ("split", True)):
        if extra == "split":
            nodes = split + nodes[1:]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        if extra is True:  # the pre-norm features are a graph output too: folding would lose them
            outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
        graph = helper.make_graph(
            nodes, "main_graph", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_voxels", 32, 10])], outputs,
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        rewrites, ops = _forms(tmp_path, graph)
        if not folded:
            assert rewrites == [] and "BatchNormalization" in ops
            continue
        if extra == "split":
            assert rewrites == ["BatchNormalization norm folded into MatMuls part0, part1 (8 channels)"]
            assert ops == ["MatMul", "MatMul", "Add", "Add", "Relu"]
        else:
            assert rewrites == ["BatchNormalization norm folded into MatMul linear (8 channels)"]
            assert ops == ["MatMul", "Add", "Relu"]
        feeds = {"x": rng.standard_normal((7, 32, 10)).astype(np.float32)}
        before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
        after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
        assert after.shape == before.shape == (7, 32, 8)
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def _vfe_like(path, seed=1, last=False):
    """A VFE layer in miniature (HardVFE): per-point features concatenated with the voxel's max
    repeated over its points, then a linear layer; the voxel count is dynamic. ``last``: the
    last layer, whose ReLU'd output is reduced to each voxel's max."""
    rng = np.random.default_rng(seed)
    tail = [helper.make_node("Relu", ["z"], ["zr"]), helper.make_node("ReduceMax", ["zr", "axis1"], ["y"], keepdims=1, name="max")]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceMax", ["r", "axis1"], ["m"], keepdims=1),
        helper.make_node("Tile", ["m", "repeats"], ["rep"]),
        helper.make_node("Concat", ["r", "rep"], ["cat"], axis=-1),
        helper.make_node("MatMul", ["cat", "w1"], ["z" if last else "y"]),
        *(tail if last else []),
    ]
    inits = {
        "w0": rng.standard_normal((5, 6)).astype(np.float32),
        "w1": rng.standard_normal((12, 7)).astype(np.float32),
        "axis1": np.array([1], np.int64),
        "repeats": np.array([1, 4, 1], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_voxels", 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    _save(graph, path)
    return {"x": rng.standard_normal((9, 4, 5)).astype(np.float32)}


def test_vfe_concat_matmul_form_is_the_same_function(tmp_path):
    feeds = _vfe_like(tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx").rewrites
    assert rewrites == ["MatMul y of Concat cat (6+6 channels) as 2 summed MatMuls (1 on the unrepeated input)"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert "Tile" not in ops and "Concat" not in ops
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
    after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
    assert after.shape == before.shape == (9, 4, 7)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # the last layer: the per-voxel MatMul the split made is a term the max moves past (the
    # forms' shapes are inferred again before the hoist)
    feeds = _vfe_like(tmp_path / "model.onnx", last=True)
    rewrites, ops = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx").rewrites, [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert rewrites[1:] == ["ReduceMax max moved before its ReLU and 1 Add"]
    assert ops[-3:] == ["ReduceMax", "Add", "Relu"]
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
    after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
    assert after.shape == before.shape == (9, 1, 7)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_voxel_max_moves_before_relu_and_shifts(tmp_path):
    """A VFE layer's tail in miniature: per-point MatMul, a per-voxel term and a per-channel
    shift added, ReLU, the max over the points. The max moves first and the result is
    bit-identical. A term that varies over the points stops the move (the shift still moves);
    with a second reader of the ReLU (a VFE layer that is not the last) nothing moves."""
    rng = np.random.default_rng(5)
    inits = {
        "w": rng.standard_normal((6, 8)).astype(np.float32),
        "shift": rng.standard_normal(8).astype(np.float32),
        "axis1": np.array([1], np.int64),
    }
    for case in ("last layer", "relu read twice", "term varies over points"):
        per_voxel = ["num_voxels", 5, 8] if case == "term varies over points" else ["num_voxels", 1, 8]
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "v"], ["hv"]),
            helper.make_node("Add", ["hv", "shift"], ["s"]),
            helper.make_node("Relu", ["s"], ["r"]),
            helper.make_node("ReduceMax", ["r", "axis1"], ["y"], keepdims=1, name="max"),
        ]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        if case == "relu read twice":
            outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
        graph = helper.make_graph(
            nodes,
            "main_graph",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["num_voxels", 5, 6]),
                helper.make_tensor_value_info("v", TensorProto.FLOAT, per_voxel),
            ],
            outputs,
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        rewrites, ops = _forms(tmp_path, graph)
        if case == "relu read twice":
            assert rewrites == [] and ops == ["MatMul", "Add", "Add", "Relu", "ReduceMax"]
            continue
        if case == "last layer":
            assert rewrites == ["ReduceMax max moved before its ReLU and 2 Adds"]
            assert ops == ["MatMul", "ReduceMax", "Add", "Add", "Relu"]
        else:
            assert rewrites == ["ReduceMax max moved before its ReLU and 1 Add"]
            assert ops == ["MatMul", "Add", "ReduceMax", "Add", "Relu"]
        feeds = {
            "x": rng.standard_normal((9, 5, 6)).astype(np.float32),
            "v": rng.standard_normal([9, *per_voxel[1:]]).astype(np.float32),
        }
        before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
        after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
        assert after.shape == before.shape == (9, 1, 8)
        np.testing.assert_array_equal(after, before)


def test_column_writes_become_one_concat(tmp_path):
    """HardVFE's ``f_center[:, :, i] = ...`` for i = 0, 1, 2 in miniature: three exported
    ScatterElements (an Identity between them, as torch emits) become one Concat of the three
    columns, and the values are the same; a column write with a reduction stays a scatter."""
    rng = np.random.default_rng(6)
    for reduction in ("none", "add"):
        nodes = [  # a node without inputs too (every form must pass over it)
            helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([7, 4, 3], np.int64))),
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        ]
        data = "zeros"
        for i in range(3):
            nodes += [
                helper.make_node("Shape", [f"u{i}"], [f"shape{i}"]),
                helper.make_node("Expand", [f"c{i}", f"shape{i}"], [f"index{i}"]),
                helper.make_node("ScatterElements", [data, f"index{i}", f"u{i}"], [f"w{i}"], axis=2, reduction=reduction),
                helper.make_node("Identity", [f"w{i}"], [f"f{i}"]),
            ]
            data = f"f{i}"
        inits = {f"c{i}": np.array(i, np.int64) for i in range(3)}
        graph = helper.make_graph(
            nodes,
            "main_graph",
            [helper.make_tensor_value_info(f"u{i}", TensorProto.FLOAT, [7, 4, 1]) for i in range(3)],
            [helper.make_tensor_value_info("f2", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        rewrites, ops = _forms(tmp_path, graph)
        if reduction == "add":
            assert rewrites == [] and ops.count("ScatterElements") == 3
            continue
        assert rewrites == [f"ScatterElements w{i} (index {i} of 3 along axis 2) as Concat" for i in range(3)]
        assert ops == ["Concat", "Identity"]  # the Identity names the graph output
        feeds = {f"u{i}": rng.standard_normal((7, 4, 1)).astype(np.float32) for i in range(3)}
        before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
        after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
        np.testing.assert_array_equal(after, before)
        np.testing.assert_array_equal(after, np.concatenate([feeds[f"u{i}"] for i in range(3)], axis=2))


def _row_scatter_graph(reduction: str, name: str, rows, channels: int):
    """``y = ScatterElements(data [rows, C], Expand(i [n, 1], Shape(u)), u [n, C], axis=0,
    reduction)``: what ``scatter_reduce`` / ``scatter_add`` with a row index ``i.expand(n, C)``
    export to."""
    nodes = [
        helper.make_node("Shape", ["u"], ["shape"]),
        helper.make_node("Expand", ["i", "shape"], ["index"]),
        helper.make_node("ScatterElements", ["data", "index", "u"], ["y"], axis=0, reduction=reduction, name=name),
    ]
    inputs = [
        helper.make_tensor_value_info("data", TensorProto.FLOAT, [rows, channels]),
        helper.make_tensor_value_info("i", TensorProto.INT64, ["n", 1]),
        helper.make_tensor_value_info("u", TensorProto.FLOAT, ["n", channels]),
    ]
    return helper.make_graph(nodes, "main_graph", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


@pytest.mark.parametrize("rows", ["m", 5])
def test_row_max_scatter_becomes_scatter_nd_that_iree_compiles(tmp_path, rows):
    """DynamicScatter's max, ``scatter_reduce(0, i.expand(N, C), u, 'amax')``, exports as a
    max-reducing ScatterElements, which IREE's importer cannot legalize. The IREE copy has a
    ScatterND with the row indices instead: onnxruntime gives the same rows on both graphs, and
    the compiled vmfb gives them too, with repeated rows (several points in one voxel). With a
    static ``data`` the flat index of model.onnx is int32, which the ScatterND takes as int64."""
    rewrites, ops = _forms(tmp_path, _row_scatter_graph("max", "smax", rows, 4))
    assert ops.count("Cast") == (2 if rows == 5 else 1)  # rows index -> flat index type (-> int64)
    # model.onnx gets the flattened scatter (cpu_forms), IREE's copy that one as a ScatterND
    assert rewrites == ["ScatterElements smax (row-wise max) on flattened tensors", "ScatterElements smax_form_flat (1-D max) as ScatterND"]
    assert "ScatterElements" not in ops and ops.count("ScatterND") == 1
    flat = onnx.load(str(tmp_path / "model.onnx"))
    assert cpu_forms(flat) == rewrites[:1]
    onnx.save(flat, str(tmp_path / "flat.onnx"))
    rng = np.random.default_rng(7)
    feeds = {
        "data": np.full((5, 4), -np.inf, np.float32),
        "i": rng.integers(0, 4, (40, 1)).astype(np.int64),  # row 4 gets nothing: stays -inf
        "u": rng.standard_normal((40, 4)).astype(np.float32),
    }
    expected = feeds["data"].copy()
    for row, values in zip(feeds["i"][:, 0], feeds["u"]):
        expected[row] = np.maximum(expected[row], values)
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
    after = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds)[0]
    flattened = ort.InferenceSession(str(tmp_path / "flat.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(before, expected)
    np.testing.assert_array_equal(after, expected)
    np.testing.assert_array_equal(flattened, expected)
    np.testing.assert_array_equal(np.asarray(_iree_run(tmp_path, feeds)[0]), expected)


def test_row_add_scatter_is_flattened_with_an_int32_index(tmp_path):
    """bev_pool's ``scatter_add(0, i.expand(N, C), u)`` (a row-wise add ScatterElements, which
    onnxruntime runs element by element through a 2-D index) runs on 1-D views: the same additions
    in the same order, so onnxruntime's sums are bit-identical, repeated rows included. ``data``
    has a static size below 2**31, so the flat index is int32 (half the memory of the int64 one).
    IREE compiles the flattened scatter and sums the same rows."""
    _save(_row_scatter_graph("add", "sadd", 6, 5), tmp_path / "model.onnx")
    flat = onnx.load(str(tmp_path / "model.onnx"))
    assert cpu_forms(flat) == ["ScatterElements sadd (row-wise add) on flattened tensors"]
    (scatter,) = [n for n in flat.graph.node if n.op_type == "ScatterElements"]
    inferred = onnx.shape_inference.infer_shapes(flat).graph.value_info
    index_type = {v.name: v.type.tensor_type.elem_type for v in inferred}[scatter.input[1]]
    assert index_type == TensorProto.INT32
    onnx.save(flat, str(tmp_path / "flat.onnx"))
    rng = np.random.default_rng(3)
    feeds = {
        "data": rng.standard_normal((6, 5)).astype(np.float32),
        "i": rng.integers(0, 5, (200, 1)).astype(np.int64),  # ~40 updates per row; row 5 gets none
        "u": rng.standard_normal((200, 5)).astype(np.float32),
    }
    expected = feeds["data"].copy()
    for row, values in zip(feeds["i"][:, 0], feeds["u"]):
        expected[row] += values  # float32, in update order
    before = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)[0]
    after = ort.InferenceSession(str(tmp_path / "flat.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(before, expected)
    np.testing.assert_array_equal(after, expected)
    compile_onnx(tmp_path / "flat.onnx", tmp_path / "flat.vmfb")
    got = np.asarray(iree_runtime(tmp_path / "flat.vmfb", list(feeds)).run(tuple(feeds.values()))[0])
    np.testing.assert_allclose(got, expected, atol=1e-5)  # IREE may sum in another order

def test_empty_gathers_leave_concats(tmp_path):
    """``Concat(Gather(Shape(x), []), ...)`` (unoptimised shape arithmetic that IREE's importer
    rejects) loses the empty input; the graph computes the same."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["none"]),
        helper.make_node("Gather", ["shape", "none"], ["empty"], axis=0),
        helper.make_node("Concat", ["empty", "two"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),
    ]
    # the exporter's empty constant: value_ints = [] (make_node cannot infer an empty list's type)
    nodes[1].attribute.append(helper.make_attribute("value_ints", [], attr_type=onnx.AttributeProto.INTS))
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1, 1], np.int64), "two")],
    )
    _save(graph, tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx").rewrites
    # the Concat left with one constant input is then folded (fold_constants)
    assert rewrites == ["1 constant shape ops as initializers", "1 empty Gather(..., []) inputs dropped from Concats"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert ops == ["Reshape"]
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    got = ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x.reshape(-1, 1))


def test_list_constants_become_initializers(tmp_path):
    """``Unsqueeze(x, Constant(value_ints=[-1]))`` fails to legalize in IREE's importer; the
    IREE copy holds the axes as an initializer instead."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["axes"], value_ints=[-1]),
            helper.make_node("Unsqueeze", ["x", "axes"], ["y"]),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    _save(graph, tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx").rewrites
    assert rewrites == ["1 list-valued Constants as initializers"]
    rewritten = onnx.load(str(tmp_path / "iree.onnx"))
    assert [n.op_type for n in rewritten.graph.node] == ["Unsqueeze"]
    assert numpy_helper.to_array(rewritten.graph.initializer[0]).tolist() == [-1]
    x = np.arange(4, dtype=np.int64)
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, {"x": x})[0], x[:, None])


def test_group_norm_exported_unoptimised_compiles_in_iree(tmp_path):
    """torch's exporter, unoptimised (graphs past ``export.OPTIMIZE_MAX_NODES``: PGD's
    7177-node head), writes GroupNorm's affine as ``Unsqueeze(weight, Range(1, Sub(c, 1), 1))``.
    IREE's importer types an Unsqueeze with computed axes as a scalar, and iree-compile failed
    ("unresolved materialization from [16] to []"). ``fold_constants`` folds the Sub, so the Range
    and the Unsqueeze fold too, and drops the shapeless types shape inference had given the
    folded values: kept, they left the Mul after them unshaped (typed ``[]`` in IREE: "operand
    type 1x16x12x10xf32 and result type f32 are cast incompatible")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.ReLU()).eval()
    x = torch.randn(1, 8, 12, 10)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, opset_version=18, external_data=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Range" in ops and ops.count("Unsqueeze") >= 2, ops
    iree_onnx(path, tmp_path / "iree.onnx")
    rewritten = onnx.load(str(tmp_path / "iree.onnx"))
    assert not {"Sub", "Range", "Unsqueeze"} & {n.op_type for n in rewritten.graph.node}
    shaped = {v.name for v in rewritten.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert all(n.output[0] in shaped for n in rewritten.graph.node if n.op_type == "Mul")
    (y,) = _iree_run(tmp_path, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_strided_pointwise_convs_become_slices(tmp_path):
    """``strided_pointwise_convs_as_slices`` (IREE's copy): 1x1 Convs with stride 2 (odd sizes:
    the last row and column are read) read one channels-last Slice(steps 2) of their input and
    run with stride 1; a padded one and a 3x3 one stay. The same values in onnxruntime and,
    compiled, in IREE."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((32, 16, 1, 1)).astype(np.float32),
        "b1": rng.standard_normal(32).astype(np.float32),
        "w2": rng.standard_normal((8, 32, 1, 1)).astype(np.float32),
        "w3": rng.standard_normal((8, 32, 3, 3)).astype(np.float32),
        "w4": rng.standard_normal((8, 16, 1, 1)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[1, 1], strides=[2, 2], name="down"),
            helper.make_node("Conv", ["a", "w2"], ["b"], kernel_shape=[1, 1], strides=[2, 1], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["a", "w3"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
            helper.make_node("Conv", ["x", "w4"], ["d"], kernel_shape=[1, 1], strides=[2, 2], name="side"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 13, 11])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "bcd"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert rewrites == [f"Conv {n} (1x1, strides [2, 2]) as Slice + Conv" for n in ("down", "side")]
    assert ops == ["Transpose", "Slice", "Transpose", "Conv", "Conv", "Conv", "Conv"]  # one Slice of x
    feeds = {"x": rng.standard_normal((1, 16, 13, 11)).astype(np.float32)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert expected[0].shape == (1, 8, 5, 8)
    compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb")
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=1e-4)


def test_strided_convs_over_few_channels_become_space_to_depth(tmp_path):
    """``strided_convs_as_space_to_depth`` (IREE's copy, where convolutions are data-tiled): a 7x7
    stride-2 stem over 3 channels (ResNet's, odd sizes), a 5x5 one over 4 channels with uneven
    pads and a 3x3 one become stride-1 Convs over the input space-to-depth; one over 5 channels
    (20 after the rearrangement), a stride-1 7x7 one and a 4x4 one whose padded input would be
    cropped stay. The same values in onnxruntime and, compiled, in IREE."""
    rng = np.random.default_rng(11)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(8, 3, 7, 7), "b1": f32(8), "w2": f32(6, 4, 5, 5), "w3": f32(4, 3, 3, 3),
             "w4": f32(4, 5, 7, 7), "w5": f32(4, 3, 7, 7), "w6": f32(4, 4, 4, 4)}  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3], name="stem"),
            helper.make_node("Relu", ["c1"], ["a"]),
            helper.make_node("Conv", ["y", "w2"], ["b"], kernel_shape=[5, 5], strides=[2, 2], pads=[1, 2, 2, 1], name="five"),
            helper.make_node("Conv", ["x", "w3"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="three"),
            helper.make_node("Conv", ["z", "w4"], ["d"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
            helper.make_node("Conv", ["x", "w5"], ["e"], kernel_shape=[7, 7], pads=[3, 3, 3, 3]),
            helper.make_node("Conv", ["v", "w6"], ["f"], kernel_shape=[4, 4], strides=[2, 2]),
        ],
        "main_graph",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 37, 50]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 24, 19]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5, 16, 16]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 4, 9, 9]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcdef"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    rewrites, ops = _forms(tmp_path, graph, conv_tiling=True)
    assert rewrites == [
        "Conv stem (7x7, stride 2, 3 channels) as a 4x4 Conv over its input space-to-depth (12 channels)",
        "Conv five (5x5, stride 2, 4 channels) as a 3x3 Conv over its input space-to-depth (16 channels)",
        "Conv three (3x3, stride 2, 3 channels) as a 2x2 Conv over its input space-to-depth (12 channels)",
    ]
    assert ops.count("Conv") == 6 and ops.count("Pad") == 3
    convs = {n.output[0]: n for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node if n.op_type == "Conv"}
    assert [a.ints for a in convs["c1"].attribute if a.name == "kernel_shape"] == [[4, 4]]
    assert iree_onnx(tmp_path / "model.onnx", tmp_path / "plain.onnx").rewrites == []  # not without conv data tiling
    names = {"x": (1, 3, 37, 50), "y": (1, 4, 24, 19), "z": (1, 5, 16, 16), "v": (1, 4, 9, 9)}
    feeds = {n: f32(*shape) for n, shape in names.items()}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert [e.shape[2:] for e in expected] == [(19, 25), (12, 9), (19, 25), (8, 8), (37, 50), (3, 3)]
    compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb")
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=1e-4)


def test_channels_last_concats_of_deconv_branches(tmp_path):
    """``channels_last_concats`` + ``cancel_transpose_pairs`` (IREE's copy), SSN's neck in
    miniature: three deconvolutions (kernel = stride; channels-last MatMuls + pixel shuffles after
    ``rewrite_deconvs``), ReLU, a channel Concat read by a 3x3 Conv and a stride-2 one (both
    Winograd). The Concat is taken channels-last and the Winograd inputs' Transposes back cancel.
    CenterPoint's and BEVFusion's neck: a Conv's (channels-first) output beside a deconvolution's,
    also concatenated channels-last; a Concat of two Conv outputs stays. The same values in
    onnxruntime and IREE."""
    rng = np.random.default_rng(5)
    f32 = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": f32(8, 8, 1, 1), "b0": f32(8), "w1": f32(8, 8, 2, 2), "w2": f32(8, 8, 4, 4), "b2": f32(8),
             "wa": f32(16, 24, 3, 3), "ba": f32(16), "wb": f32(16, 24, 3, 3), "wc": f32(8, 8, 3, 3)}  # fmt: skip
    nodes = [
        helper.make_node("ConvTranspose", ["x0", "w0", "b0"], ["d0"], kernel_shape=[1, 1], strides=[1, 1]),
        helper.make_node("ConvTranspose", ["x1", "w1"], ["d1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["x2", "w2", "b2"], ["d2"], kernel_shape=[4, 4], strides=[4, 4]),
        *[helper.make_node("Relu", [f"d{i}"], [f"r{i}"]) for i in range(3)],
        helper.make_node("Concat", ["r0", "r1", "r2"], ["cat"], axis=1, name="neck"),
        helper.make_node("Conv", ["cat", "wa", "ba"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="head"),
        helper.make_node("Conv", ["cat", "wb"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="down"),
        helper.make_node("Conv", ["x0", "wc"], ["c0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["x1", "w1"], ["e1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["c0", "e1"], ["mixed"], axis=1, name="mixed"),
        helper.make_node("Concat", ["c0", "x0"], ["plain"], axis=1, name="plain"),
    ]
    inputs = {"x0": (1, 8, 12, 12), "x1": (1, 8, 6, 6), "x2": (1, 8, 3, 3)}
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b", "mixed", "plain")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    rewrites, _ = _forms(tmp_path, graph, winograd=True)
    assert [r for r in rewrites if r.startswith("Concat")] == [
        "Concat neck of 3 branches (3 channels-last) concatenated channels-last",
        "Concat mixed of 2 branches (1 channels-last) concatenated channels-last",
    ]
    assert [r for r in rewrites if "Winograd" in r] == [
        "Conv head (3x3, 24 -> 16 channels) as Winograd F(4x4, 3x3)",
        "Conv down (3x3, stride 2, 24 -> 16 channels) as Winograd F(4x4, 3x3)",
    ]
    assert "2 pair(s) of Transposes that cancel dropped" in rewrites  # the Winograd inputs'
    formed = onnx.load(str(tmp_path / "iree.onnx")).graph
    axes = {n.name: next(a.i for a in n.attribute if a.name == "axis") for n in formed.node if n.op_type == "Concat"}
    assert axes["neck_form_nhwc"] == 3 and axes["mixed_form_nhwc"] == 3 and axes["plain"] == 1
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in inputs.items()}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert [e.shape for e in expected] == [(1, 16, 12, 12), (1, 16, 6, 6), (1, 16, 12, 12), (1, 16, 12, 12)]
    compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb")
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=1e-4)


def test_grouped_deconvs_become_convs_that_iree_compiles(tmp_path):
    """``grouped_deconvs_as_convs`` (IREE's copy): SMOKE's DLA upsampling is a depthwise
    ConvTranspose (256 groups, 4x4 kernel, stride 2, padding 1; one 8x8, stride 4, padding 2),
    which iree-compile 3.13 rejects ("'tensor.collapse_shape' op expected reassociation map #0 to
    have size equal to the expanded rank (5)"). Depthwise ones become sums of shifted products,
    one per output phase (no product with a stuffed zero); others a grouped Conv over the
    zero-stuffed, padded input with the flipped kernel (two channels a group, odd stride and
    output padding). The same values in onnxruntime and IREE; an ungrouped one stays."""
    rng = np.random.default_rng(4)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(16, 1, 4, 4), "w2": f32(16, 3, 3, 3), "b2": f32(24), "w3": f32(16, 4, 2, 2), "w4": f32(16, 1, 8, 8), "b4": f32(16)}
    graph = helper.make_graph(
        [
            helper.make_node("ConvTranspose", ["x", "w1"], ["a"], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1], group=16, name="up"),
            helper.make_node(
                "ConvTranspose", ["x", "w2", "b2"], ["b"], kernel_shape=[3, 3], strides=[3, 2], pads=[0, 1, 2, 1],
                output_padding=[1, 0], group=8, name="odd",
            ),
            helper.make_node("ConvTranspose", ["x", "w3"], ["c"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node(
                "ConvTranspose", ["x", "w4", "b4"], ["d"], kernel_shape=[8, 8], strides=[4, 4], pads=[2, 2, 3, 2],
                output_padding=[1, 0], group=16, name="up4",
            ),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 7, 9])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcd"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert [r for r in rewrites if "groups)" in r] == [
        "ConvTranspose up (4x4, stride [2, 2], 16 groups) as 4 phases of shifted products",
        "ConvTranspose odd (3x3, stride [3, 2], 8 groups) as a grouped Conv over the zero-stuffed input",
        "ConvTranspose up4 (8x8, stride [4, 4], 16 groups) as 16 phases of shifted products",
    ]
    assert ops.count("ConvTranspose") == 0 and ops.count("MatMul") == 1  # the ungrouped one: rewrite_deconvs
    assert ops.count("Conv") == 1  # the odd one's; no depthwise Conv
    feeds = {"x": f32(1, 16, 7, 9)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert [e.shape for e in expected] == [(1, 16, 14, 18), (1, 24, 20, 17), (1, 4, 14, 18), (1, 16, 28, 36)]
    compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb")
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=1e-4)


def test_row_max_pools_become_reductions_that_iree_compiles(tmp_path):
    """``row_max_pools_as_reductions`` (IREE's copy): a MaxPool over windows of one row (FPS's
    first argmax level, which IREE ran as a data-tiled convolution) as Slice + Reshape +
    ReduceMax, the trailing partial window dropped as MaxPool drops it; with a static width and
    with a dynamic one (the whole windows' end from the Shape). A 3x3 MaxPool stays. The same
    values in onnxruntime and IREE."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[1, 8], strides=[1, 8], name="rows"),
        helper.make_node("MaxPool", ["y"], ["b"], kernel_shape=[1, 16], strides=[1, 16], name="dyn"),
        helper.make_node("MaxPool", ["x"], ["c"], kernel_shape=[3, 3], strides=[2, 2], name="square"),
    ]
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 61]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, "n"]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abc"],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert "2 MaxPool(s) over windows of one row as Slice + Reshape + ReduceMax" in rewrites
    assert ops.count("MaxPool") == 1 and ops.count("ReduceMax") == 2
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((2, 3, 5, 61)).astype(np.float32), "y": rng.standard_normal((1, 1, 1, 1000)).astype(np.float32)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert [e.shape for e in expected] == [(2, 3, 5, 7), (1, 1, 1, 62), (2, 3, 2, 30)]
    for got in (ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds), _iree_run(tmp_path, feeds)):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_stride1_convs_become_shifted_sums_of_one_matmul_under_im2col(tmp_path):
    """``shifted_output_convs`` (IREE's copy when its flags send convolutions through im2col):
    stride-1 Convs read channels-last (by Convs, through a ReLU) become one channels-last MatMul
    over all taps + a Sum of shifted Slices (3x3 padded with a bias; 3x2 with uneven pads, batch 2,
    no bias), and so does one whose small output (8x fewer channels) is a graph output. A strided
    one, a grouped one, a 1x1 one, one with more output than input channels and one whose
    full-width output is a graph output stay. Without ``im2col`` nothing changes. The same
    values in onnxruntime and, compiled with ``portable`` (im2col on any host), in IREE."""
    rng = np.random.default_rng(6)
    f32 = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    inits = {
        "w1": f32(8, 8, 3, 3), "b1": f32(8), "w2": f32(6, 8, 3, 2), "w7": f32(4, 6, 1, 1), "w3": f32(8, 8, 3, 3),
        "w4": f32(8, 4, 3, 3), "w5": f32(4, 8, 1, 1), "w6": f32(16, 8, 3, 3), "w8": f32(8, 8, 3, 3), "w9": f32(1, 8, 3, 3),
    }  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="same"),
            helper.make_node("Conv", ["a", "w2"], ["u"], kernel_shape=[3, 2], pads=[2, 0, 1, 1], name="uneven"),
            helper.make_node("Relu", ["u"], ["r"]),
            helper.make_node("Conv", ["r", "w7"], ["b"], kernel_shape=[1, 1]),
            helper.make_node("Conv", ["a", "w3"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["a", "w4"], ["d"], kernel_shape=[3, 3], group=2),
            helper.make_node("Conv", ["a", "w5"], ["e"], kernel_shape=[1, 1]),
            helper.make_node("Conv", ["a", "w6"], ["f"], kernel_shape=[3, 3]),
            helper.make_node("Conv", ["a", "w8"], ["g"], kernel_shape=[3, 3], name="wide_out"),
            helper.make_node("Conv", ["a", "w9"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="small_out"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 9, 7])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "bcdefgh"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    _save(graph, tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "plain.onnx").rewrites
    assert not [r for r in rewrites if "shifted sums" in r]
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx", im2col=True).rewrites
    assert [r for r in rewrites if "shifted sums" in r] == [
        "Conv same (3x3, 8 -> 8 channels) as one MatMul over its taps + shifted sums",
        "Conv uneven (3x2, 8 -> 6 channels) as one MatMul over its taps + shifted sums",
        "Conv small_out (3x3, 8 -> 1 channels) as one MatMul over its taps + shifted sums",
    ]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert ops.count("Conv") == 6 and ops.count("MatMul") == 3 and ops.count("Slice") == 9 + 6 + 9
    feeds = {"x": f32(2, 8, 9, 7)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    assert [e.shape for e in expected][:1] == [(2, 4, 10, 7)]
    info = compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb", "portable")
    assert len([r for r in info.rewrites if "shifted sums" in r]) == 3
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=1e-5)


def test_winograd_matrices_compute_the_correlation():
    """Toom-Cook F(m, 3) from its points: ``AT ((G g) * (BT d))`` is the 1-D correlation, for the
    form's points and for Lavin's F(2, 3); repeated points are refused."""
    rng = np.random.default_rng(7)
    for m, points in ((WINOGRAD_TILE, WINOGRAD_POINTS), (2, (0, 1, -1)), (4, (0, 1, -1, 2, -2))):
        bt, g, at = winograd_matrices(m, 3, points)
        assert bt.shape == (m + 2, m + 2) and g.shape == (m + 2, 3) and at.shape == (m, m + 2)
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), [k @ d[i : i + 3] for i in range(m)], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="distinct"):
        winograd_matrices(2, 3, (0, 1, 1))


@pytest.mark.parametrize("batch", [1, 2])
def test_wide_3x3_convs_become_winograd_with_data_tiling(tmp_path, batch):
    """``winograd_convs`` (IREE's copy when its flags data-tile, im2col or not): stride-1
    3x3 Convs with at least 16 input and output channels become Winograd F(4x4, 3x3) (36 MatMuls
    on a Split each), read channels-last or not (batch 1 and 2, sizes that are not multiples of
    the tile, uneven pads, with and without a bias, a graph output of exactly 16 channels, more
    output than input channels), and a stride-2 one on the same padded input as a stride-1 one
    (every other row and column of its output), whose first pass reads the padded input's Slices
    without reshaping them. A narrow one (15 channels) and one whose output is smaller than a tile
    go to ``shifted_output_convs`` under im2col and stay Convs without it;
    a strided one whose padded input no stride-1 one reads stays a Conv. The same values in
    onnxruntime and, compiled with ``portable`` (im2col on any host) and ``host`` (data-tiled
    direct convolutions on an AVX-512 host), in IREE."""
    rng = np.random.default_rng(8)
    f32 = lambda *s: (rng.standard_normal(s) * np.sqrt(2 / (9 * s[1] if len(s) > 1 else 1))).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(32, 32, 3, 3), "b1": f32(32), "w2": f32(32, 32, 3, 3), "w3": f32(15, 32, 3, 3), "w4": f32(8, 32, 1, 1),
             "w8": f32(8, 15, 1, 1), "w5": f32(16, 32, 3, 3), "w6": f32(32, 32, 3, 3), "w7": f32(32, 32, 3, 3), "w9": f32(48, 32, 3, 3),
             "w10": f32(24, 32, 3, 3)}  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="same"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["u"], kernel_shape=[3, 3], pads=[2, 0, 1, 1], name="uneven"),
            helper.make_node("Conv", ["u", "w3"], ["v"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="narrow"),
            helper.make_node("Conv", ["v", "w8"], ["b"], kernel_shape=[1, 1]),
            helper.make_node("Conv", ["r", "w5"], ["c"], kernel_shape=[3, 3], name="graph_output"),
            helper.make_node("Conv", ["r", "w6"], ["d"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Slice", ["x", "s0", "s1", "s2"], ["small"]),
            helper.make_node("Conv", ["small", "w7"], ["e"], kernel_shape=[3, 3], name="small_input"),
            helper.make_node("Conv", ["e", "w4"], ["f"], kernel_shape=[1, 1]),
            helper.make_node("Conv", ["x", "w9"], ["g"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="widening"),
            helper.make_node("Conv", ["x", "w10"], ["h"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="strided"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 32, 11, 9])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "bcdfgh"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("s0", [0, 0]), ("s1", [5, 5]), ("s2", [2, 3]))],
    )
    _save(graph, tmp_path / "model.onnx")
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "plain.onnx").rewrites
    assert not [r for r in rewrites if "Winograd" in r or "shifted sums" in r]
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "direct.onnx", winograd=True).rewrites
    winograd = [r for r in rewrites if "Winograd" in r]
    assert len(winograd) == 5 and not [r for r in rewrites if "shifted sums" in r]
    nodes = onnx.load(str(tmp_path / "direct.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("Conv") == 5 and ops.count("MatMul") == 5 * 36
    # the first pass reads the padded input's Slices as they are: IREE 3.13 copies a Slice it must reshape first
    padded = {n.output[0] for n in nodes if n.op_type == "Pad"}
    padded |= {n.output[0] for n in nodes if n.op_type == "Reshape" and n.input[0] in padded}
    windows = {n.output[0] for n in nodes if n.op_type == "Slice" and n.input[0] in padded}
    assert len(windows) == 5 * 6 and {n.op_type for n in nodes if windows & set(n.input)} == {"Mul"}
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx", im2col=True, winograd=True).rewrites
    assert [r for r in rewrites if "Winograd" in r or "shifted sums" in r] == [
        "Conv same (3x3, 32 -> 32 channels) as Winograd F(4x4, 3x3)",
        "Conv uneven (3x3, 32 -> 32 channels) as Winograd F(4x4, 3x3)",
        "Conv graph_output (3x3, 32 -> 16 channels) as Winograd F(4x4, 3x3)",
        "Conv widening (3x3, 32 -> 48 channels) as Winograd F(4x4, 3x3)",
        "Conv strided (3x3, stride 2, 32 -> 24 channels) as Winograd F(4x4, 3x3)",
        "Conv narrow (3x3, 32 -> 15 channels) as one MatMul over its taps + shifted sums",
        "Conv small_input (3x3, 32 -> 32 channels) as one MatMul over its taps + shifted sums",
    ]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert ops.count("Conv") == 3 and ops.count("MatMul") == 5 * 36 + 2 and ops.count("Split") == 5
    feeds = {"x": rng.standard_normal((batch, 32, 11, 9)).astype(np.float32)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    shapes = [(8, 12, 8), (16, 9, 7), (32, 6, 5), (8, 3, 3), (48, 11, 9), (24, 6, 5)]
    assert [e.shape for e in expected] == [(batch, *s) for s in shapes]
    info = compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb", "portable")
    assert [r for r in info.rewrites if "Winograd" in r] == winograd
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=2e-5)
    info = compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb", "host")
    assert [r for r in info.rewrites if "Winograd" in r] == winograd
    assert len([r for r in info.rewrites if "shifted sums" in r]) == (0 if host_isa() == "avx512" else 2)
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=2e-5)


def test_winograd_convs_on_one_large_input_share_their_products(tmp_path):
    """``winograd_convs``: the Winograd convolutions on one padded input whose tiles take
    ``WINOGRAD_SHARED_LHS_BYTES`` or more (64 channels, 64 x 64 tiles: 1 MiB a point) share their
    36 MatMuls, kernels side by side (two stride-1 ones with and without a bias and a stride-2 one),
    each reading its columns; one with other pads on the same input and the same convolutions on a
    quarter of the input keep their own. Products that are not data-tiled are never shared. The same
    values in onnxruntime and, compiled with ``host``, in IREE."""
    rng = np.random.default_rng(9)
    f32 = lambda *s: (rng.standard_normal(s) * np.sqrt(2 / (9 * s[1] if len(s) > 1 else 1))).astype(np.float32)  # noqa: E731
    inits = {"w1": f32(32, 64, 3, 3), "b1": f32(32), "w2": f32(16, 64, 3, 3), "w3": f32(24, 64, 3, 3), "w4": f32(16, 64, 3, 3)}
    same, none = [1, 1, 1, 1], [0, 0, 0, 0]
    convs = [("x", "w1", "b1", same, [1, 1], "a"), ("x", "w2", "", same, [1, 1], "b"), ("x", "w3", "", same, [2, 2], "c"),
             ("x", "w4", "", none, [1, 1], "d"), ("q", "w1", "b1", same, [1, 1], "e"), ("q", "w2", "", same, [1, 1], "f")]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s0", "s1", "s2"], ["q"])]
        + [helper.make_node("Conv", [x, w, b], [y], kernel_shape=[3, 3], pads=p, strides=st, name=y) for x, w, b, p, st, y in convs],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 256, 256])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for *_, y in convs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("s0", [0, 0]), ("s1", [128, 128]), ("s2", [2, 3]))],
    )
    _save(graph, tmp_path / "model.onnx")
    shared = ", products shared by 3 convolutions"
    expected_rewrites = [
        f"Conv a (3x3, 64 -> 32 channels) as Winograd F(4x4, 3x3){shared}",
        f"Conv b (3x3, 64 -> 16 channels) as Winograd F(4x4, 3x3){shared}",
        f"Conv c (3x3, stride 2, 64 -> 24 channels) as Winograd F(4x4, 3x3){shared}",
        "Conv d (3x3, 64 -> 16 channels) as Winograd F(4x4, 3x3)",
        "Conv e (3x3, 64 -> 32 channels) as Winograd F(4x4, 3x3)",
        "Conv f (3x3, 64 -> 16 channels) as Winograd F(4x4, 3x3)",
    ]
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx", winograd=True).rewrites
    assert [r for r in rewrites if "Winograd" in r] == expected_rewrites
    products = [n for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node if n.op_type == "MatMul"]
    assert len(products) == 4 * 36
    feeds = {"x": rng.standard_normal((1, 64, 256, 256)).astype(np.float32)}
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    info = compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb", "host")
    assert [r for r in info.rewrites if "Winograd" in r] == (expected_rewrites if host_isa() == "avx512" else [])
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=2e-5)
    from codegen.graph_forms import winograd_convs

    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "model.onnx")))
    assert not [r for r in winograd_convs(model, tiled_products=False) if "shared" in r]


def test_winograd_products_that_are_not_data_tiled_get_rows_iree_vectorises():
    """IREE takes the largest divisor of a matmul's static row count up to 8 as its row tile:
    BEVFusion's 90 x 90 maps (23 x 23 Winograd tiles, 529 rows: tile 1) ran their products 3.5x
    slower than on 23 x 24 tiles. Rows that are a multiple of 8 or whose row tile of 5 or more
    divides the workgroup tile (a divisor up to 64) of at least 32 rows are kept; others grow to
    the smallest such grid (PGD's 375 rows, in workgroups of 25, ran 2.2x slower than 400)."""
    from codegen.graph_forms import _product_grid, _rows_vectorise

    assert [r for r in (529, 552, 2025, 2160, 2070, 2116, 550, 2200, 837, 625, 375, 2345, 2010) if _rows_vectorise(r)] == [
        552, 2025, 2160, 550, 2200, 2345
    ]
    assert _product_grid(1, 15, 25) == (16, 25)  # PGD's 58 x 100 maps: 375 rows (workgroups of 25) -> 400
    assert _product_grid(1, 23, 23) == (23, 24) and _product_grid(2, 23, 23) == (23, 24)  # 1104 rows
    assert _product_grid(1, 45, 45) == (45, 45) and _product_grid(1, 31, 27) == (32, 27)  # 2025; 837 -> 864
    assert _product_grid(1, 1, 1) == (1, 1)  # 1 row: below a vector, one tile


def test_convs_of_graphs_whose_matmuls_are_not_data_tiled(tmp_path):
    """A graph with a gathered-row product (a dynamic row count, K >= GATHERED_ROWS_MIN_K) keeps
    its matmuls out of data tiling on an AVX-512 host, so its Winograd convolution with 23 x 23
    output tiles (90 x 90, 529 rows) runs on 23 x 24 and its stride-1 1x1 convolutions (with and
    without a bias) become channels-last MatMuls (``pointwise_convs_as_matmuls``) and its static
    products with K = 1280 (300 rows, padded to 304) and 4224 (beyond LONG_REDUCTION) two and four
    MatMuls over K chunks of 640 and 1056, and the one with K = 512 and N = 1024 (B beyond
    MATMUL_CHUNK_FLOATS) two over chunks of 256 (``chunked_long_matmuls``; IREE's copy says so),
    unless convolutions go through im2col (matmuls data-tiled: none of these; the K = 4224 product
    is then split in two levels by ``split_long_reductions``). A 1x1 convolution over rows
    transposed to channels-first through a BatchNorm and ReLU takes them on the rows. The same
    values in onnxruntime and IREE."""
    from codegen.graph_forms import LONG_REDUCTION, MATMUL_CHUNK_FLOATS, MATMUL_K_CHUNK
    from codegen.iree import GATHERED_ROWS_MIN_K

    long_k, longer_k = MATMUL_K_CHUNK + 128, LONG_REDUCTION + 128
    assert MATMUL_CHUNK_FLOATS // 1024 < 512 < MATMUL_K_CHUNK

    rng = np.random.default_rng(3)
    inits = {"w": (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32),
             "p": (rng.standard_normal((24, 16, 1, 1)) / 4).astype(np.float32), "q": (rng.standard_normal((8, 24, 1, 1)) / 5).astype(np.float32),
             "pb": rng.standard_normal(24).astype(np.float32), "m": (rng.standard_normal((GATHERED_ROWS_MIN_K, 8)) / 16).astype(np.float32),
             "l": (rng.standard_normal((long_k, 8)) / 36).astype(np.float32), "o": (rng.standard_normal((longer_k, 8)) / 64).astype(np.float32),
             "bw": (rng.standard_normal((512, 1024)) / 22).astype(np.float32), "p2": (rng.standard_normal((24, 16, 1, 1)) / 4).astype(np.float32),
             "bn_g": rng.uniform(0.5, 2, 16).astype(np.float32), "bn_b": rng.standard_normal(16).astype(np.float32),
             "bn_m": rng.standard_normal(16).astype(np.float32), "bn_v": rng.uniform(0.5, 2, 16).astype(np.float32),
             "s3": np.array([1, 64, 16], np.int64), "s4": np.array([1, 16, 8, 8], np.int64)}  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="bev"),
            helper.make_node("Conv", ["y", "p", "pb"], ["u"], kernel_shape=[1, 1], name="pointwise"),
            helper.make_node("Relu", ["u"], ["r"]),
            helper.make_node("Conv", ["r", "q"], ["v"], name="unbiased"),
            helper.make_node("MatMul", ["rows", "m"], ["z"], name="gathered"),
            helper.make_node("MatMul", ["cols", "l"], ["t"], name="long"),
            helper.make_node("MatMul", ["wide", "o"], ["s"], name="longer"),
            helper.make_node("MatMul", ["broad", "bw"], ["g"], name="broad"),
            helper.make_node("Reshape", ["dcn", "s3"], ["d3"]),
            helper.make_node("Transpose", ["d3"], ["dt"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["dt", "s4"], ["d4"]),
            helper.make_node("BatchNormalization", ["d4", "bn_g", "bn_b", "bn_m", "bn_v"], ["dn"]),
            helper.make_node("Relu", ["dn"], ["dr"]),
            helper.make_node("Conv", ["dr", "p2"], ["e"], name="after_bn"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 90, 90]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", GATHERED_ROWS_MIN_K]),
         helper.make_tensor_value_info("cols", TensorProto.FLOAT, [300, long_k]),
         helper.make_tensor_value_info("wide", TensorProto.FLOAT, [264, longer_k]),
         helper.make_tensor_value_info("broad", TensorProto.FLOAT, [256, 512]),
         helper.make_tensor_value_info("dcn", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yvztsge"],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    _save(graph, tmp_path / "model.onnx")
    grown = [
        "Conv pointwise (1x1, 16 -> 24 channels) as MatMul(x, W) channels-last",
        "Conv unbiased (1x1, 24 -> 8 channels) as MatMul(x, W) channels-last",
        "Conv after_bn (1x1, 16 -> 24 channels) as MatMul(x, W) channels-last (its input's BatchNorm and ReLU on the producer's rows)",
        f"MatMul long (K = {long_k}, N = 8) as 2 MatMuls over K chunks of {long_k // 2}, 300 rows padded to 304",
        f"MatMul longer (K = {longer_k}, N = 8) as 4 MatMuls over K chunks of {longer_k // 4}",
        "MatMul broad (K = 512, N = 1024) as 2 MatMuls over K chunks of 256",
        "Conv bev (3x3, 16 -> 16 channels) as Winograd F(4x4, 3x3) on 23 x 24 tiles (not 23 x 23)",
    ]
    plain = ["Conv bev (3x3, 16 -> 16 channels) as Winograd F(4x4, 3x3)"]
    forms = lambda rewrites: [r for r in rewrites if "Winograd" in r or "MatMul(x, W)" in r or "K chunks" in r]  # noqa: E731
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "iree.onnx", winograd=True).rewrites
    assert forms(rewrites) == grown
    ops = [n.op_type for n in onnx.load(str(tmp_path / "iree.onnx")).graph.node]
    assert ops.count("Conv") == 0 and ops.count("MatMul") == 36 + 3 + 1 + 2 + 4 + 2 and "BatchNormalization" not in ops
    rewrites = iree_onnx(tmp_path / "model.onnx", tmp_path / "im2col.onnx", im2col=True, winograd=True).rewrites
    assert forms(rewrites) == plain
    feeds = {"x": rng.standard_normal((1, 16, 90, 90)).astype(np.float32), "rows": rng.standard_normal((37, GATHERED_ROWS_MIN_K)).astype(np.float32),
             "cols": rng.standard_normal((300, long_k)).astype(np.float32), "wide": rng.standard_normal((264, longer_k)).astype(np.float32),
             "broad": rng.standard_normal((256, 512)).astype(np.float32), "dcn": rng.standard_normal((64, 16)).astype(np.float32)}  # fmt: skip
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, feeds)
    info = compile_onnx(tmp_path / "model.onnx", tmp_path / "model.vmfb", "host")
    assert forms(info.rewrites) == (grown if host_isa() == "avx512" else plain)
    _iree_copy_and_vmfb_match(tmp_path, feeds, expected, atol=2e-5)


# ------------------------------------------------------------------ static shapes


def _wrapper_attrs(path) -> dict:
    import ast

    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PATCHES", "INPUT_NAMES"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


@pytest.mark.parametrize(
    "wrapper, rule",
    [
        ("wrapper_pointpillars_hv_secfpn_8xb6_160e_kitti_3d_car.py", "repeat"),
        ("wrapper_centerpoint_pillar02_second_secfpn_8xb4_cyclic_20e_nus_3d.py", "repeat"),
        ("wrapper_pointpillars_dv_secfpn_8xb6_160e_kitti_3d_car.py", "invalid"),
        ("wrapper_second_dv_secfpn_8xb6_80e_kitti_3d_car.py", "invalid"),
        ("wrapper_second_hv_secfpn_8xb6_80e_kitti_3d_car.py", None),  # a repeated voxel = a duplicate sparse site
    ],
)
def test_padding_rule_per_model(wrapper, rule):
    attrs = _wrapper_attrs(REPO / "generated" / wrapper)
    assert padding_rule(attrs["PATCHES"], attrs["INPUT_NAMES"]) == rule


def test_padding_fills_exactly_as_documented():
    voxels = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    coors = np.array([[0, 0, 5, 7], [0, 0, 5, 8], [0, 0, 6, 1]], np.int32)
    static = {"num_voxels": {"size": 5, "inputs": {"voxels": 0, "coors": 0}}}
    repeated = pad_inputs({"voxels": voxels, "coors": coors}, static, "repeat")
    assert repeated["coors"].tolist()[3:] == [[0, 0, 5, 7]] * 2
    np.testing.assert_array_equal(repeated["voxels"][3:], voxels[[0, 0]])
    invalid = pad_inputs({"voxels": voxels, "coors": coors}, static, "invalid")
    assert (invalid["coors"][3:] == -1).all() and (invalid["voxels"][3:] == 0).all()
    np.testing.assert_array_equal(invalid["voxels"][:3], voxels)
    assert set(PADDINGS) == {"repeat", "invalid"}
    with pytest.raises(ExportError, match="compiled for at most 2"):
        pad_inputs({"voxels": voxels, "coors": coors}, {"num_voxels": {"size": 2, "inputs": {"coors": 0}}}, "repeat")


# ------------------------------------------------------------------ end to end


def _iree_export(tmp_path, config, *flags, dataset="KittiDataset", fmt="iree", sizes=2):
    frame_path(dataset)
    out = tmp_path / "out"
    # sparse-conv models take 5-10 min (ONNX conversion + iree-compile) on this machine
    proc = cli("--config", config, "--output-dir", str(out), "--device", "cpu", "--format", fmt, *flags, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    formats = parse_formats(fmt)
    assert meta["formats"] == {f: {"pt2": "model.pt2", "onnx": "model.onnx", "iree": "model.vmfb"}[f] for f in formats}
    assert sorted(p.name for p in out.glob("model.*")) == sorted([*meta["formats"].values(), "model.iree.onnx"])
    # model.onnx's opset: 19 with native DeformConv nodes (codegen.ops.native), else 18
    assert meta["iree"]["onnx"] == "model.iree.onnx" and meta["onnx_opset"] in (18, 19)
    assert meta["validation"]["passed"], meta["validation"]["summary"]
    assert set(meta["validation"]["max_abs_diff"]) == {"eager-patched", *formats}
    # two samples of different sizes (one where the test pipeline samples a fixed point count)
    assert len({r["size"] for r in meta["validation"]["rows"] if r["runtime"] == "iree"}) == sizes
    assert meta["versions"]["iree-base-compiler"] == meta["versions"]["iree-base-runtime"]
    # the C heap settings the vmfb was validated with, for whoever deploys it (codegen.memory)
    assert meta["runtime_options"]["iree"]["environment"]["MALLOC_ARENA_MAX"] == "1"
    assert ("onnxruntime" in meta["runtime_options"]) == ("onnx" in formats)
    return out, meta


def test_long_sums_are_split_so_iree_sums_them_like_onnxruntime(tmp_path):
    """``split_long_reductions`` (IREE's copy): a softmax over 32400 values and the MatMul of the
    result with K = 32400 (BEVFusion's cross-attention over its BEV cells) become sums of 180 sums
    of 180. The same function in onnxruntime; in IREE the row sums stay within 2e-6 of 1 (measured
    4.3e-7; summed in order, as IREE does unsplit: 6.5e-6) and the product within 4e-8 of float64
    (8.5e-9; unsplit 1.4e-7)."""
    from codegen.graph_forms import split_long_reductions

    rng = np.random.default_rng(0)
    n = 32400
    values = rng.standard_normal((n, 16)).astype(np.float32)
    x = (rng.standard_normal((8, n)) * 0.5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("MatMul", ["s", "v"], ["y"])],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, n])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [8, n]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
        [numpy_helper.from_array(values, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    split = onnx.load(str(path))
    assert split_long_reductions(split) == ["Softmax s over 32400 as 180 sums of 180", "MatMul y K=32400 as 180 partial products of 180"]
    onnx.checker.check_model(split)
    original = ort.InferenceSession(str(path)).run(None, {"x": x})
    rewritten = ort.InferenceSession(split.SerializeToString()).run(None, {"x": x})
    for a, b in zip(original, rewritten):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    info = compile_onnx(path, tmp_path / "m.vmfb")
    assert len(info.rewrites) == 2
    s, y = iree_runtime(tmp_path / "m.vmfb", ["x"], static={}).run((x,))
    exact = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    exact /= exact.sum(1, keepdims=True)
    assert np.abs(s.sum(1, dtype=np.float64) - 1).max() < 2e-6
    assert np.abs(y - exact @ values.astype(np.float64)).max() < 4e-8


def test_long_instance_norms_are_split_and_two_pass_in_iree(tmp_path):
    """``split_long_reductions`` (IREE's copy): an InstanceNormalization over 245,760 values (SMOKE's
    GroupNorm head: 8 channels x 96 x 320 a group) becomes a two-pass mean and variance of sums of
    sums; one over 3840 stays. IREE's own lowering was 1.7e-4 from float64 on data of mean 3 and
    std 2 (onnxruntime 1.6e-5); the form: 5e-6."""
    rng = np.random.default_rng(5)
    scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5, name="long"),
            helper.make_node("InstanceNormalization", ["z", "s", "b"], ["w"], epsilon=1e-5, name="short"),
        ],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 245760]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 60, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "yw"],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")],
    )
    rewrites, ops = _forms(tmp_path, graph)
    assert rewrites == ["InstanceNormalization long over 245760 as 512 sums of 480 (two passes)"]
    assert ops.count("InstanceNormalization") == 1
    feeds = {"x": (rng.standard_normal((1, 8, 245760)) * 2 + 3).astype(np.float32), "z": rng.standard_normal((1, 8, 60, 64)).astype(np.float32)}

    def exact(x):
        x = x.astype(np.float64).reshape(1, 8, -1)
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return y * scale[:, None] + bias[:, None]

    for got in (ort.InferenceSession(str(tmp_path / "iree.onnx")).run(None, feeds), _iree_run(tmp_path, feeds)):
        assert np.abs(got[0] - exact(feeds["x"])).max() < 2e-5
        assert np.abs(got[1].reshape(1, 8, -1) - exact(feeds["z"])).max() < 2e-5


def _attention(tmp_path, batch: list, m: int, k: int, c: int, n: int):
    """``Relu(MatMul(Softmax(MatMul(q [.., m, c], kt [.., c, k])), v [.., k, n]))`` saved as an ONNX
    file: its path, random ``(q, kt, v)`` and the float64 result."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((*batch, m, c)).astype(np.float32)
    kt = rng.standard_normal((*batch, c, k)).astype(np.float32)
    v = rng.standard_normal((*batch, k, n)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["q", "kt"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"]),
            helper.make_node("Relu", ["y"], ["out"]),
        ],
        "main_graph",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(x.shape)) for name, x in (("q", q), ("kt", kt), ("v", v))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [*batch, m, n])],
    )
    path = tmp_path / "m.onnx"
    _save(graph, path)
    scores = q.astype(np.float64) @ kt.astype(np.float64)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    exact = np.maximum((weights / weights.sum(-1, keepdims=True)) @ v.astype(np.float64), 0)
    return path, (q, kt, v), exact


def test_attention_is_split_without_transposing_its_probabilities(tmp_path):
    """``split_long_reductions`` on a whole attention (BEVFusion's cross-attention: 8 heads, 200
    queries, 32400 BEV cells): the scores come out as [8, 180, 200, 180] parts, the value product
    is summed over the parts and divided by the softmax's sum once; no Softmax, no Div and no
    Transpose over the 8 x 200 x 32400 probabilities. onnxruntime and IREE give the float64
    attention within 1e-5 and closer than onnxruntime's unsplit original."""
    from codegen.graph_forms import split_long_reductions

    h, m, c, n = 8, 200, 16, 32400
    path, (q, kt, v), exact = _attention(tmp_path, [h], m, n, c, c)
    split = onnx.load(str(path))
    assert split_long_reductions(split) == ["attention y over 32400 as parts of 180"]
    onnx.checker.check_model(split)
    ops = [node.op_type for node in split.graph.node]
    assert "Softmax" not in ops and ops.count("Transpose") == 1 and ops.count("Div") == 1
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in onnx.shape_inference.infer_shapes(split).graph.value_info}
    transposed = next(node.output[0] for node in split.graph.node if node.op_type == "Transpose")
    assert shapes[transposed] == [h, 180, c, 180]  # the keys, not the probabilities
    feeds = {"q": q, "kt": kt, "v": v}
    original = ort.InferenceSession(str(path)).run(None, feeds)[0]
    rewritten = ort.InferenceSession(split.SerializeToString()).run(None, feeds)[0]
    # onnxruntime, against the float64 attention: the split form 2.7e-6, the unsplit original
    # 1.1e-5 (AVX-512 hosts) to 2.3e-5 (AVX2: MLAS's other kernels); the two differ by as much
    assert np.abs(rewritten - exact).max() < min(1e-5, np.abs(original - exact).max())

    # IREE exports fuse whole attentions (fused_attentions, the next test); the split form compiles too
    onnx.save(split, str(tmp_path / "split.onnx"))
    compile_onnx(tmp_path / "split.onnx", tmp_path / "m.vmfb")
    got = iree_runtime(tmp_path / "m.vmfb", ["q", "kt", "v"], static={}).run((q, kt, v))[0]
    # measured 3.3e-6
    assert np.abs(got - exact).max() < min(1e-5, np.abs(original - exact).max())


@pytest.mark.parametrize(
    "batch, m, k, c, n, block",
    [([8], 200, 32400, 16, 16, 144), ([2, 3], 5, 4608, 8, 4, 64)],
    ids=["bevfusion", "two_batch_dims"],
)
def test_long_attentions_are_fused_per_block_in_iree(tmp_path, batch, m, k, c, n, block):
    """``split_long_reductions`` with ``fused_attentions`` (IREE's copy): an attention over ``k >=
    4096`` keys (BEVFusion's cross-attention: 8 heads, 200 queries, 32400 BEV cells) becomes one
    ``OnlineAttention`` node over blocks of ``block`` keys, which ``fuse_online_attentions`` turns
    into IREE's ``iree_linalg_ext.online_attention``, and the blocks' combination. IREE gives the
    float64 attention within 1e-5 and closer than onnxruntime's unsplit original."""
    from codegen.graph_forms import ONLINE_ATTENTION, split_long_reductions

    path, (q, kt, v), exact = _attention(tmp_path, batch, m, k, c, n)
    fused = onnx.load(str(path))
    assert split_long_reductions(fused, fused_attentions=True) == [f"attention y over {k} keys as one fused attention per block of {block} (IREE's online_attention)"]
    ops = [node.op_type for node in fused.graph.node]
    assert ops.count(ONLINE_ATTENTION[1]) == 1 and "Softmax" not in ops and ops.count("MatMul") == 0

    info = compile_onnx(path, tmp_path / "m.vmfb")
    assert "1 OnlineAttention node(s) as iree_linalg_ext.online_attention" in info.rewrites
    got = iree_runtime(tmp_path / "m.vmfb", ["q", "kt", "v"], static={}).run((q, kt, v))[0]
    original = ort.InferenceSession(str(path)).run(None, {"q": q, "kt": kt, "v": v})[0]
    assert np.abs(got - exact).max() < min(1e-5, np.abs(original - exact).max())


def test_host_preset_sends_convolutions_through_im2col_without_avx512():
    """``host`` data-tiles direct convolutions on AVX-512 CPUs only; elsewhere they go through
    im2col as in ``portable`` (PointPillars on a Zen 3 host: 7.6 s -> 0.6 s), all else unchanged."""
    from codegen.iree import CONV_DATA_TILING, IM2COL_CONVS, PRESETS, preset_flags

    assert preset_flags("host", "avx512") == PRESETS["host"] and IM2COL_CONVS not in PRESETS["host"]
    for isa in ("avx2", "other"):
        flags = preset_flags("host", isa)
        assert IM2COL_CONVS in flags and CONV_DATA_TILING not in flags
        assert set(flags) - {IM2COL_CONVS} == set(PRESETS["host"]) - {CONV_DATA_TILING}
    for preset in ("portable", "default"):
        assert preset_flags(preset, "avx2") == preset_flags(preset, "avx512") == PRESETS[preset]


@pytest.mark.parametrize("k, tiled", [(432, False), (64, True)])
def test_matmuls_of_gathered_rows_are_not_data_tiled(tmp_path, k, tiled):
    """The host preset data-tiles matmuls unless one multiplies a dynamic row count by K >= 256
    (a sparse convolution's gathered rows: SECOND, BEVFusion). Such a product is vectorised with
    peeled loops (``VECTOR_PEELING``: unmasked full tiles, a remainder loop), the graph's static
    products are not; the vmfb computes both for row counts that are and are not a whole number
    of tiles. Without AVX-512 every matmul is data-tiled: the convolutions go through im2col as
    matmuls, which need it."""
    from codegen.iree import IM2COL_CONVS, MATMUL_DATA_TILING

    rng = np.random.default_rng(2)
    w = rng.standard_normal((k, 16)).astype(np.float32)
    w2 = rng.standard_normal((256, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["rows", "w"], ["y"]), helper.make_node("MatMul", ["grid", "w2"], ["z"])],
        "main_graph",
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", k]),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, [200, 256]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [200, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )
    _save(graph, tmp_path / "m.onnx")
    info = compile_onnx(tmp_path / "m.onnx", tmp_path / "m.vmfb")
    tiled = tiled or IM2COL_CONVS in info.flags
    assert (MATMUL_DATA_TILING in info.flags) == tiled
    peeled = [r for r in info.rewrites if "peeled loops" in r]
    assert peeled == ([] if tiled else ["1 dynamic-row matmul dispatches vectorised with peeled loops (--iree-llvmcpu-vector-pproc-strategy=peel)"])
    runtime = iree_runtime(tmp_path / "m.vmfb", ["rows", "grid"], static={})
    grid = rng.standard_normal((200, 256)).astype(np.float32)
    for count in (37, 256):
        rows = np.random.default_rng(count).standard_normal((count, k)).astype(np.float32)
        y, z = runtime.run((rows, grid))
        np.testing.assert_allclose(y, rows @ w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(z, grid @ w2, rtol=1e-5, atol=1e-4)


def test_static_matmuls_that_are_not_data_tiled_take_wide_vector_tiles(tmp_path):
    """Where matmuls are not data-tiled (a gathered-row product in the graph) on AVX-512, a static
    matmul whose N is a multiple of 32 runs 32-column vector tiles with K steps of 8
    (``WIDE_MATMUL_TILES``) instead of IREE's 8 x 16 and 16; N = 48 keeps IREE's. The vmfb
    computes the same products; with data-tiled matmuls (no AVX-512) nothing is rewritten."""
    from codegen.iree import MATMUL_DATA_TILING

    rng = np.random.default_rng(3)
    w = rng.standard_normal((432, 16)).astype(np.float32)
    w2 = rng.standard_normal((256, 256)).astype(np.float32)
    w3 = rng.standard_normal((256, 48)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["rows", "w"], ["y"]),
            helper.make_node("MatMul", ["grid", "w2"], ["z"]),
            helper.make_node("MatMul", ["grid", "w3"], ["u"]),
        ],
        "main_graph",
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 432]),
            helper.make_tensor_value_info("grid", TensorProto.FLOAT, [400, 256]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [400, 256]),
            helper.make_tensor_value_info("u", TensorProto.FLOAT, [400, 48]),
        ],
        [numpy_helper.from_array(a, name) for a, name in ((w, "w"), (w2, "w2"), (w3, "w3"))],
    )
    _save(graph, tmp_path / "m.onnx")
    info = compile_onnx(tmp_path / "m.onnx", tmp_path / "m.vmfb")
    widened = [r for r in info.rewrites if "WIDE_MATMUL_TILES" in r]
    if MATMUL_DATA_TILING in info.flags:
        assert widened == []
    else:
        assert widened == ["1 static matmul(s) not data-tiled with 32-column vector tiles and K steps of 8 (WIDE_MATMUL_TILES)"]
    runtime = iree_runtime(tmp_path / "m.vmfb", ["rows", "grid"], static={})
    rows, grid = rng.standard_normal((37, 432)).astype(np.float32), rng.standard_normal((400, 256)).astype(np.float32)
    y, z, u = runtime.run((rows, grid))
    np.testing.assert_allclose(y, rows @ w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(z, grid @ w2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(u, grid @ w3, rtol=1e-5, atol=1e-4)


def test_freed_buffers_stay_in_the_process_for_the_next_call():
    """``retain_freed_memory`` (called by ``iree_runtime``): a freed 64 MB block of the C heap is
    reused without page faults, as IREE's transient buffers then are on every call (in a
    subprocess: the setting is process-wide). Also from a thread started afterwards, as IREE's
    workers are: glibc's per-thread arenas map a block over 64 MB afresh whatever the mmap
    settings say, so every thread must share the main heap."""
    code = """
import ctypes, resource, threading
from codegen.memory import retain_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def faults_of_a_second_block(size=64 << 20):
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def in_a_thread():
    result = []
    worker = threading.Thread(target=lambda: result.append(faults_of_a_second_block(96 << 20)))
    worker.start()
    worker.join()
    return result[0]
print(faults_of_a_second_block(), retain_freed_memory(), faults_of_a_second_block(), in_a_thread())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    default, applied, retained, thread = proc.stdout.split()
    assert applied == "True"
    # glibc's default maps a 64 MB block afresh each time: one fault per 4 KB page
    assert int(default) > 4000 and int(retained) < 100 and int(thread) < 100, proc.stdout


def test_onnxruntime_and_iree_forms_are_two_programs():
    """``same_program`` (export: one ONNX export serves both when the forms change nothing): a
    sort of integer keys is ``torch.sort`` in onnxruntime's forms and a radix sort in IREE's."""
    from codegen.export import same_program
    from codegen.ops.points import export_forms
    from codegen.ops.sort import sort_keys

    class Sort(torch.nn.Module):
        def forward(self, keys):
            return sort_keys(keys, 1 << 12)[0] * 2

    keys = torch.randint(0, 1 << 12, (64,))
    programs = {}
    for iree in (False, True, False):
        with export_forms(iree):
            programs.setdefault(iree, []).append(torch.export.export(Sort(), (keys,), strict=False))
    assert same_program(*programs[False])
    assert not same_program(programs[False][0], programs[True][0])
    for program in (programs[False][0], programs[True][0]):
        assert torch.equal(program.module()(keys), torch.sort(keys).values * 2)


def test_pointpillars_compiles_in_iree_and_matches_eager(tmp_path):
    """The shipped default, dynamic voxel count, tuned preset: graph forms applied, parity. With
    every format: PointPillars' graph (voxels in) has no op whose form differs between
    onnxruntime and IREE, so the vmfb's ONNX is model.onnx itself before onnxruntime's own form."""
    out, meta = _iree_export(tmp_path, CONFIG, fmt="all")
    iree = meta["iree"]
    assert iree["preset"] == "host" and "--iree-llvmcpu-target-cpu=host" in iree["flags"]
    assert iree["static"] is None and iree["function"] == "main_graph"
    # the CPU graph forms are in both ONNX files (onnxruntime runs them too); model.iree.onnx is
    # model.onnx before onnxruntime's own form (the deconvolutions as 1x1 Convs + DepthToSpace)
    neutral = [r for r in meta["onnx_graph_forms"] if "for onnxruntime" not in r]
    assert iree["onnx_graph_forms"] == neutral and sum("as MatMul + pixel shuffle" in r for r in neutral) == 3
    assert sum(r.endswith("before the shuffle)") for r in meta["onnx_graph_forms"]) == 3
    ops = {f: [n.op_type for n in onnx.load(str(out / f)).graph.node] for f in ("model.onnx", "model.iree.onnx")}
    assert ops["model.onnx"].count("DepthToSpace") == 2 and ops["model.iree.onnx"].count("DepthToSpace") == 0
    assert ops["model.iree.onnx"].count("MatMul") == ops["model.onnx"].count("MatMul") + 6  # 3 deconvolutions, 3 heads
    # data-tiled direct convolutions on an AVX-512 CPU, im2col on others (9-12x faster there);
    # on both, the backbone's 13 stride-1 3x3 convolutions (64-256 channels) are Winograd F(4x4, 3x3)
    from codegen.iree import CONV_DATA_TILING, IM2COL_CONVS

    assert iree["host_isa"] == host_isa() in ("avx512", "avx2")
    conv_flags = [f for f in iree["flags"] if f in (CONV_DATA_TILING, IM2COL_CONVS)]
    assert conv_flags == [CONV_DATA_TILING if host_isa() == "avx512" else IM2COL_CONVS]
    winograd = [r for r in iree["graph_rewrites"] if r.endswith("as Winograd F(4x4, 3x3)")]
    assert len(winograd) == 13
    # and the first one's Transpose to channels-last cancels the BEV canvas's permute to NCHW
    assert iree["graph_rewrites"] == winograd + ["1 pair(s) of Transposes that cancel dropped"]
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-5  # measured 5.6e-8
    assert "iree" in (out / "validation.txt").read_text()


@pytest.mark.slow  # a generate run (~30 s) for one error line: CI keeps one IREE end-to-end test
def test_static_size_smaller_than_the_sample_is_one_error_line(tmp_path):
    frame_path("KittiDataset")
    proc = cli("--config", CONFIG, "--output-dir", str(tmp_path / "o"), "--device", "cpu", "--format", "iree", "--iree-static", "100")
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --iree-static 100 is smaller than the sample's num_voxels (3945)"]


@pytest.mark.slow
@pytest.mark.parametrize("preset, static", [("host", "12000"), ("portable", None), ("default", None)])
def test_pointpillars_static_shapes_and_the_default_preset(tmp_path, preset, static):
    """Every preset is validated; static shapes (inputs padded to 12000 voxels) give the same outputs."""
    flags = ["--iree-preset", preset] + (["--iree-static", static] if static else [])
    _, meta = _iree_export(tmp_path, CONFIG, *flags)
    iree = meta["iree"]
    assert iree["preset"] == preset
    if static:
        assert iree["static"] == {"num_voxels": {"size": 12000, "inputs": {"voxels": 0, "num_points": 0, "coors": 0}}}
        assert iree["padding"] == "repeat" and iree["padding_rule"] == PADDINGS["repeat"]
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-5


# the other models that export to ONNX (docs/iree.md has their numbers): dataset of their frame
OTHER_MODELS = {
    "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d": "NuScenesDataset",
    "pointpillars_hv_fpn_sbn-all_8xb4-2x_nus-3d": "NuScenesDataset",
    # its DynamicScatter max as a ScatterND in IREE's copy (0.7 s a frame; with the sorts, which
    # IREE lowers to O(n^2) loops, it took minutes)
    "pointpillars_dv_secfpn_8xb6-160e_kitti-3d-car": "KittiDataset",
    # sparse convolutions: the rulebooks' sorts as radix sorts in IREE exports (codegen.ops.sort)
    "second_hv_secfpn_8xb6-80e_kitti-3d-car": "KittiDataset",
    "centerpoint_voxel01_second_secfpn_8xb4-cyclic-20e_nus-3d": "NuScenesDataset",
    # and its DynamicScatter over the 41 x 1600 x 1408 grid (no counting) radix-sorted
    "second_dv_secfpn_8xb6-80e_kitti-3d-car": "KittiDataset",
    # seventeenth session: SSN's shape-aware head, SA-SSD and Part-A2's SparseUNet encoders
    "ssn_hv_secfpn_sbn-all_16xb2-2x_nus-3d": "NuScenesDataset",
    "sassd_8xb6-80e_kitti-3d-3class": "KittiDataset",
    "parta2_hv_secfpn_8xb2-cyclic-80e_kitti-3d-3class": "KittiDataset",
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(OTHER_MODELS))
def test_other_models_compile_in_iree_and_match_eager(tmp_path, config):
    from codegen.iree import IM2COL_CONVS, MATMUL_DATA_TILING

    _, meta = _iree_export(tmp_path, config, dataset=OTHER_MODELS[config])
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-4
    # sparse convolutions' gathered rows are multiplied without data tiling (GATHERED_ROWS_MIN_K),
    # vectorised with peeled loops (VECTOR_PEELING); without AVX-512 (convolutions through im2col)
    # every matmul is data-tiled
    tiled = config.startswith(("centerpoint_pillar", "pointpillars", "ssn")) or IM2COL_CONVS in meta["iree"]["flags"]
    peeled = any("peeled loops" in r for r in meta["iree"]["graph_rewrites"])
    assert (MATMUL_DATA_TILING in meta["iree"]["flags"]) == tiled == (not peeled)


def _shipped_with(tmp_path, shipped: str, overrides: str) -> str:
    """A config file inheriting mmdet3d's shipped ``shipped`` (relative to its configs) with
    ``overrides`` (smaller sizes for a quick compile); its path."""
    from codegen.configs import shipped_config_root

    config = tmp_path / f"{Path(shipped).stem}_smaller.py"
    config.write_text(f"_base_ = [{str(shipped_config_root() / shipped)!r}]\n{overrides}\n")
    return str(config)


def test_votenet_compiles_in_iree_and_matches_eager(tmp_path):
    """VoteNet (PointNet++ set abstraction, FPS, ball queries, vote aggregation) end to end in
    IREE on the SUN RGB-D frame, with fewer centres per stage (64/32/16/16, 16 proposals) so
    that the unrolled FPS loops compile in a minute; the shipped sizes: docs/iree.md.  Needed the
    one-channel gather and the ball query without TopK (``codegen.ops.points``)."""
    config = _shipped_with(
        tmp_path,
        "votenet/votenet_8xb16_sunrgbd-3d.py",
        "model = dict(backbone=dict(num_points=(64, 32, 16, 16)), bbox_head=dict(vote_aggregation_cfg=dict(num_point=16)))",
    )
    _, meta = _iree_export(tmp_path, config, dataset="SUNRGBDDataset", sizes=1)  # 20000 points
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-5
    assert meta["export_info"]["tensor_details"][0]["shape"][-1] == 4  # x, y, z, height


# point models with fewer centres than shipped (the unrolled FPS loops then compile in a minute):
# shipped config, overrides, dataset of the frame
FEWER_CENTRES = {
    # its decoder's 16 x 288 LayerNorm dispatch kept 36 KB on the stack (iree.BASE_FLAGS: 64 KB)
    "groupfree3d": (
        "groupfree3d/groupfree3d_head-L6-O256_4xb8_scannet-seg.py",
        "model = dict(backbone=dict(num_points=(64, 32, 16, 16)), bbox_head=dict(num_proposal=16))",
        "ScanNetDataset",
    ),
    # the first stage (PointNet2SAMSG, multi-scale grouping; ball queries take at least as many
    # points as samples, so the last levels keep 48 and 32)
    "point_rcnn": (
        "point_rcnn/point-rcnn_8xb2_kitti-3d-3class.py",
        "model = dict(backbone=dict(num_points=(128, 64, 48, 32)))",
        "KittiDataset",
    ),
}


@pytest.mark.parametrize("name", [pytest.param("groupfree3d"), pytest.param("point_rcnn", marks=pytest.mark.slow)])
def test_point_models_with_fewer_centres_compile_in_iree_and_match_eager(tmp_path, name):
    shipped, overrides, dataset = FEWER_CENTRES[name]
    _, meta = _iree_export(tmp_path, _shipped_with(tmp_path, shipped, overrides), dataset=dataset, sizes=1)  # fixed point counts
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-4


# image models beyond SMOKE (CI) and PGD (tests/test_mono3d.py), compiled with no change of their own
# (seventeenth session): one nuScenes camera image, mirrored for the second sample (one size)
CAMERA_MODELS = ("fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-1x_nus-mono3d", "mask-rcnn_r50_fpn_1x_nuim")


@pytest.mark.slow
@pytest.mark.parametrize("config", CAMERA_MODELS)
def test_camera_models_compile_in_iree_and_match_eager(tmp_path, config):
    _, meta = _iree_export(tmp_path, config, dataset="NuScenesDataset", sizes=1)
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-3  # measured 4.8e-4 (FCOS3D), 1.2e-6


def test_smoke_compiles_in_iree_and_matches_eager(tmp_path):
    """SMOKE (DLA-34, DCNv2, GroupNorm everywhere) on the KITTI image, onnxruntime and IREE. Needed:
    its depthwise upsampling ConvTransposes in another form (``grouped_deconvs_as_convs``; IREE
    rejected them) and its long GroupNorms as two-pass sums of sums (``split_long_reductions``:
    IREE's own ended 6.4e-3 from eager, over the recipe's 2e-3; measured now 7.5e-5, onnxruntime
    3.7e-4). The onnxruntime export broke at a DCN offset view (``ops.deform_conv``)."""
    out, meta = _iree_export(tmp_path, "smoke_dla34_dlaneck_gn-all_4xb8-6x_kitti-mono3d", fmt="onnx,iree", sizes=1)
    assert meta["validation"]["max_abs_diff"]["iree"] < 5e-4
    # its 8 depthwise upsampling ConvTransposes as sums of shifted products, one per output phase
    assert sum("phases of shifted products" in r for r in meta["iree"]["graph_rewrites"]) == 8
    # its 16 DCNs: onnxruntime's native DeformConv in model.onnx (opset 19), tensor ops for IREE
    ops = {name: [n.op_type for n in onnx.load(str(out / name), load_external_data=False).graph.node] for name in ("model.onnx", "model.iree.onnx")}
    assert ops["model.onnx"].count("DeformConv") == 16 and "DeformConv" not in ops["model.iree.onnx"]
    assert meta["onnx_opset"] == 19 and "native DeformConv nodes (codegen.ops.native)" in meta["onnx_graph_forms"]
    # their products over gathered samples are multiplied without data tiling (GATHERED_ROWS_MIN_K)
    # unless the convolutions go through im2col (no AVX-512); their row counts are static: no
    # dispatch is vectorised with peeled loops (VECTOR_PEELING)
    from codegen.iree import IM2COL_CONVS, MATMUL_DATA_TILING

    assert (MATMUL_DATA_TILING in meta["iree"]["flags"]) == (IM2COL_CONVS in meta["iree"]["flags"])
    assert not any("peeled loops" in r for r in meta["iree"]["graph_rewrites"])
    # so its 1x1 convolutions are channels-last MatMuls there (all but the two widest inputs, the
    # head's 256 x 96 x 320: POINTWISE_MATMUL_MAX)
    pointwise = sum("MatMul(x, W) channels-last" in r for r in meta["iree"]["graph_rewrites"])
    assert pointwise == (0 if IM2COL_CONVS in meta["iree"]["flags"] else 15)
    # and its products with K > 1152 are MatMuls over K chunks (chunked_long_matmuls): its DCNs'
    # (K = 2304; the 512-channel one's K = 4608 too, not split_long_reductions') and the 1x1
    # convolution's over the 1280 concatenated channels (N = 512: chunks of at most 576)
    chunked = sorted(r.split(" (K = ")[1] for r in meta["iree"]["graph_rewrites"] if "K chunks" in r)
    expected = ["1280, N = 512) as 3 MatMuls over K chunks of 426-427"] + ["2304, N = 128) as 2 MatMuls over K chunks of 1152"] * 2
    expected += ["2304, N = 256) as 2 MatMuls over K chunks of 1152", "2304, N = 64) as 2 MatMuls over K chunks of 1152", "4608, N = 256) as 4 MatMuls over K chunks of 1152"]
    assert chunked == ([] if IM2COL_CONVS in meta["iree"]["flags"] else expected)


@pytest.mark.slow
def test_pv_rcnn_compiles_in_iree_and_matches_eager(tmp_path):
    """PV-RCNN (sparse convs, keypoint FPS, stacked ball queries, RoI grid pooling, fixed-K NMS)
    in IREE on the KITTI frame, with 64 keypoints instead of 2048 (the unrolled FPS); ~5 min.
    Needed the top-k cut without TopK (``codegen.ops.sort.kth_largest``) and the ball query
    without TopK: IREE sorted their rows whole."""
    config = _shipped_with(tmp_path, "pv_rcnn/pv_rcnn_8xb2-80e_kitti-3d-3class.py", "model = dict(points_encoder=dict(num_keypoints=64))")
    _, meta = _iree_export(tmp_path, config)
    assert meta["validation"]["max_abs_diff"]["iree"] < 1e-4
    assert "TopK" not in {node.op_type for node in onnx.load(str(tmp_path / "out" / "model.iree.onnx"), load_external_data=False).graph.node}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, dataset",
    [(CONFIG, "KittiDataset"), ("pointpillars_dv_secfpn_8xb6-160e_kitti-3d-car", "KittiDataset")],
)
def test_padding_leaves_the_outputs_unchanged(tmp_path, config, dataset):
    """The padding rule of each kind (repeat a voxel / coordinates -1), on the exported dynamic
    graph in onnxruntime: padded inputs give the unpadded outputs (what a static vmfb relies on)."""
    frame_path(dataset)
    out = tmp_path / "out"
    proc = cli("--config", config, "--output-dir", str(out), "--device", "cpu", "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    wrapper = _wrapper_attrs(next(out.glob("wrapper_*.py")))
    rule = padding_rule(wrapper["PATCHES"], wrapper["INPUT_NAMES"])
    meta = json.loads((out / "metadata.json").read_text())
    inputs = dict(np.load(out / "inputs.npz"))
    rows = next(iter(inputs.values())).shape[0]
    static = {dim: {"size": rows + 1000, "inputs": spec["inputs"]} for dim, spec in meta["dynamic_dims"].items()}
    session = ort.InferenceSession(str(out / "model.onnx"))
    plain = session.run(None, inputs)
    padded = session.run(None, pad_inputs(inputs, static, rule))
    for a, b in zip(plain, padded):
        np.testing.assert_array_equal(a, b)


def test_an_online_attention_node_in_an_unknown_import_form_is_an_error(tmp_path):
    """``fuse_online_attentions`` leaves modules without the node untouched and names a node it
    cannot match (instead of iree-compile's "failed to legalize operation" later)."""
    from codegen.iree import fuse_online_attentions

    plain = tmp_path / "plain.mlir"
    plain.write_text('%0 = torch.operator "onnx.Relu"(%arg0) : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>\n')
    assert fuse_online_attentions(plain) == 0
    odd = tmp_path / "odd.mlir"
    odd.write_text('%0 = torch.operator "onnx.OnlineAttention"(%arg0) : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>\n')
    with pytest.raises(ExportError, match="OnlineAttention"):
        fuse_online_attentions(odd)
