"""metadata.json: what was exported, from what, with which inputs/outputs, and how it validated."""

from __future__ import annotations

import importlib.metadata
import platform

from . import __version__
from .errors import ExportError
from .memory import RETAIN_MEMORY_ENV
from .validate import ORT_CONFIG

PACKAGES = (
    "torch", "mmcv", "mmdet", "mmdet3d", "mmengine", "onnx", "onnxruntime", "onnxscript",
    "iree-base-compiler", "iree-base-runtime", "numpy",
)  # fmt: skip
# format -> file in the output directory
MODEL_FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "iree": "model.vmfb"}
FORMATS = tuple(MODEL_FILES)
# the ONNX export in IREE's op forms that model.vmfb is compiled from (codegen/iree.py)
IREE_ONNX = "model.iree.onnx"
FORMAT_ALIASES = {"both": ("pt2", "onnx"), "all": FORMATS}


def parse_formats(spec: str) -> tuple[str, ...]:
    """``pt2``, ``onnx``, ``iree``, ``both`` (pt2+onnx), ``all`` or a comma list (``onnx,iree``)
    -> the formats in canonical order. ``iree`` writes model.vmfb and the ONNX export it is
    compiled from (``IREE_ONNX``), not model.onnx."""
    chosen = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in FORMAT_ALIASES:
            chosen.update(FORMAT_ALIASES[part])
        elif part in FORMATS:
            chosen.add(part)
        else:
            choices = ", ".join([*FORMATS, *FORMAT_ALIASES])
            raise ExportError(f"unknown format {part!r} in --format {spec} (choose from {choices}, or a comma list)")
    return tuple(f for f in FORMATS if f in chosen)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "mmdet3d-export": __version__}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def build_metadata(
    *, config_ref, checkpoint, model, recipe, analysis, frame, samples, formats, opset, report, wrapper_file, timings,
    iree=None,
    onnx_forms=None,
) -> dict:
    used = analysis.used_inputs
    runtime_options = {
        **({"onnxruntime": dict(ORT_CONFIG)} if "onnx" in formats else {}),
        **({"iree": {"environment": dict(RETAIN_MEMORY_ENV)}} if "iree" in formats else {}),
    }
    return {
        "model_config": config_ref,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "model_type": type(model).__name__,
        "recipe": recipe.name,
        "wrapper": wrapper_file,
        "frame": frame if frame is not None else "synthetic",
        "sample_points": [s.num_raw_points for s in samples],
        "export_info": {
            "total_inputs": len(used),
            "input_names": [t.name for t in used],
            "input_structure": analysis.structure,
            "tensor_details": [
                {
                    "path": t.path,
                    "name": t.name or None,
                    "shape": t.symbolic_shape,
                    "sample_shape": t.shape,
                    "dtype": t.dtype,
                    "description": t.description,
                    "used": t.used,
                }
                for t in analysis.inputs
            ],
            "constants": [{"path": c.path, "value": c.value} for c in analysis.constants],
        },
        "outputs": [{"name": t.name, "shape": t.shape, "dtype": t.dtype, "source": t.path} for t in analysis.outputs],
        "dynamic_dims": {
            dim: {"min": recipe.min_dim, "inputs": members} for dim, members in analysis.dynamic_dims().items()
        },
        "formats": {f: MODEL_FILES[f] for f in formats},
        "onnx_opset": opset,
        # CPU graph forms applied to model.onnx, node by node (codegen/graph_forms.py)
        **({"onnx_graph_forms": onnx_forms} if onnx_forms is not None else {}),
        # the onnxruntime session settings validation ran with (and `run` uses): codegen.validate;
        # the C heap settings of the tool's IREE runtime, as environment variables: codegen.memory
        **({"runtime_options": runtime_options} if runtime_options else {}),
        # how model.vmfb was compiled (preset, flags, graph rewrites, static shapes): codegen/iree.py
        **({"iree": iree} if iree else {}),
        "batch_size": analysis.batch_size,
        "versions": versions(),
        "timings_s": timings,
        "validation": {k: report[k] for k in ("passed", "reference", "atol", "rtol", "max_abs_diff", "summary", "rows")},
    }
