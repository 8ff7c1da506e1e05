"""Export a module alone with torch.export + ONNX (dynamic sizes) and check both against eager."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def forbidden_onnx_ops(path) -> list[str]:
    """Ops the house rules exclude: ScatterND add (onnxruntime race), NonZero, max/min scatters."""
    import onnx

    bad = []
    for node in onnx.load(str(path)).graph.node:
        reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        if node.op_type == "NonZero" or (node.op_type == "ScatterND" and reduction != "none"):
            bad.append(f"{node.op_type}[{reduction}]")
        if node.op_type == "ScatterElements" and reduction in ("max", "min"):
            bad.append(f"{node.op_type}[{reduction}]")
    return bad


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_exports(
    module: torch.nn.Module,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    dynamic_shapes,
    tmp_path: Path,
    atol: float = 1e-5,
    exact: bool = False,
    onnx: bool = True,
) -> torch.export.ExportedProgram:
    """Export ``module`` on ``inputs[0]``; run eager, the reloaded PT2 and onnxruntime on every
    input tuple (at least two sizes, without re-exporting) and require equal results
    (``exact`` for integer outputs such as indices).  As ``codegen.export`` does, the PT2 holds
    the tensor-op forms of ``codegen.ops.native``'s ops and the ONNX file their native nodes."""
    import onnx as onnx_lib

    from codegen.ops import native

    assert len(inputs) >= 2, "check at least two input sizes"
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, tuple(a.clone() for a in inputs[0]), dynamic_shapes=dynamic_shapes, strict=False)
    pt2 = tmp_path / "op.pt2"
    torch.export.save(native.decomposed(program), str(pt2))
    reloaded = torch.export.load(str(pt2)).module()
    session = None
    if onnx:
        import onnxruntime as ort

        path = tmp_path / "op.onnx"
        torch.onnx.export(
            program, (), str(path), dynamo=True, opset_version=18, external_data=False,
            custom_translation_table=native.translation_table(),
        )
        model = onnx_lib.load(str(path))
        if native.require_opsets(model):
            onnx_lib.save(model, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for args in inputs:
        with torch.no_grad():
            ref = [_np(o) for o in _flat(module(*[a.clone() for a in args]))]
            runs = {"pt2": [_np(o) for o in _flat(reloaded(*[a.clone() for a in args]))]}
        if session is not None:
            names = [i.name for i in session.get_inputs()]
            runs["onnx"] = session.run(None, {n: _np(a) for n, a in zip(names, args)})
        for runtime, outs in runs.items():
            assert len(outs) == len(ref), runtime
            for i, (r, o) in enumerate(zip(ref, outs)):
                assert r.shape == o.shape, f"{runtime} output {i}: shape {o.shape} != {r.shape}"
                if exact or r.dtype.kind in "iub":
                    np.testing.assert_array_equal(o, r, err_msg=f"{runtime} output {i}")
                else:
                    np.testing.assert_allclose(o, r, atol=atol, rtol=1e-5, err_msg=f"{runtime} output {i}")
    return program
