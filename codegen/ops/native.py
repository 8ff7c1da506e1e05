"""Ops onnxruntime runs natively: exported as one standard ONNX node in ``model.onnx``.

Some ops of this library exist as a single ONNX operator that onnxruntime implements in C++
(opset 19's ``DeformConv``: onnxruntime's CPU kernel since 1.25, this project pins 1.32) and that
IREE 3.13 does not lower.  Written out in tensor ops they cost onnxruntime passes over large
intermediates: a modulated DCN on 96 x 320 pixels, 64 channels, runs 150-180 ms in its four
bilinear Gather / Mul / Add passes and one MatMul against 56-75 ms as ``DeformConv`` (one thread).

Each such op is a ``torch.library`` custom op (namespace ``mmdet3d_export``) that the op library
calls only while exporting in onnxruntime's forms (``native_exporting``: not in ``iree_forms``,
never eagerly).  Its entry here gives

- ``translation``: the ONNX node (``torch.onnx.export(custom_translation_table=...)``), and the
  opset it needs (``require_opsets`` raises the model's default-domain opset to it; the opsets
  between 18 and 19 only add types and modes, the float32 ops of these graphs are unchanged);
- ``decomposition``: the op library's tensor-op form, which ``decomposed`` substitutes before the
  program is saved as ``model.pt2`` (a PT2 loads in plain torch, without this package).

Eager runs, PT2 files and IREE exports keep the tensor-op forms; ``model.onnx`` validates against
eager like every other export (tests/ops/test_deform_conv.py checks the nodes against mmcv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import forms

NAMESPACE = "mmdet3d_export"


@dataclass(frozen=True)
class NativeOp:
    op: torch._ops.OpOverload  # the custom op the export graph holds
    onnx_op: str  # the standard ONNX operator it becomes
    opset: int  # the default-domain opset that operator needs
    translation: Callable  # onnxscript: custom op arguments -> ONNX node
    decomposition: Callable  # custom op arguments -> the tensor-op form (PT2)


#: custom op -> its entry; filled by the op modules (``register``)
REGISTRY: dict[torch._ops.OpOverload, NativeOp] = {}


def register(entry: NativeOp) -> NativeOp:
    REGISTRY[entry.op] = entry
    return entry


def native_exporting() -> bool:
    """Whether the op being traced becomes its native ONNX node: exporting in onnxruntime's forms."""
    return torch.compiler.is_exporting() and not forms.IREE


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    return {entry.op: entry.translation for entry in REGISTRY.values()}


def used(program: torch.export.ExportedProgram) -> list[NativeOp]:
    """The registered ops in ``program``'s graphs (nested ones included)."""
    targets = {
        node.target
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function"
    }
    return [entry for op, entry in REGISTRY.items() if op in targets]


def decomposed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every registered op replaced by its tensor-op form (unchanged if it has none)."""
    entries = used(program)
    if not entries:
        return program
    return program.run_decompositions({entry.op: entry.decomposition for entry in entries})


def require_opsets(model) -> list[str]:
    """Raise the ``onnx.ModelProto``'s default-domain opset to what its native nodes need; return
    the operators that needed it."""
    needs = {e.onnx_op: e.opset for e in REGISTRY.values()}
    found = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in needs})
    if found:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, *(needs[op] for op in found))
    return found
