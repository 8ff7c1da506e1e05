"""Stage 2 (steps 8-9): import a generated wrapper, export PT2 + ONNX (+ IREE vmfb), validate, write outputs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import torch

from . import sample as smp
from .configs import resolve_config
from .errors import ExportError, ValidationFailed, first_line
from .boxes import BOX_OUTPUTS
from .generate import Generated, analyse_inputs, analyse_outputs, predict_context
from .graph_forms import cpu_forms, onnxruntime_forms
from .metadata import IREE_ONNX, build_metadata, parse_formats
from .ops import native
from .ops.points import export_forms
from .progress import Steps
from .recipes import BY_NAME, recipe_for
from .iree import Compiled, IreeOptions, compile_onnx, iree_runtime, padding_rule
from .validate import Runtime, onnx_runtime, render_report, validate

ONNX_OPSET = 18
OPTIMIZE_MAX_NODES = 1500


def import_wrapper(path: str | os.PathLike) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"wrapper not found: {path}")
    name = f"mmdet3d_export_wrapper_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ExportError(f"cannot import wrapper {path}: {type(exc).__name__}: {exc}") from None
    for attr in ("ExportWrapper", "build", "flat_inputs", "INPUT_NAMES", "OUTPUT_NAMES", "DYNAMIC_DIMS", "FRAME", "RECIPE"):
        if not hasattr(module, attr):
            raise ExportError(f"{path} is not a generated wrapper (no {attr})")
    return module


def input_args(module: ModuleType, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(inputs[name] for name in module.INPUT_NAMES)


def fresh(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Every runtime gets its own copy: the original PillarFeatureNet writes into its input."""
    return tuple(a.clone() for a in args)


def export_program(module: ModuleType, wrapper: torch.nn.Module, args: tuple[torch.Tensor, ...]):
    from torch.export import Dim

    dims = {name: Dim(name, min=getattr(module, "MIN_DIM", 2)) for name in module.DYNAMIC_DIMS}
    shapes = tuple(
        {axis: dims[dim] for dim, members in module.DYNAMIC_DIMS.items() for n, axis in members.items() if n == name} or None
        for name in module.INPUT_NAMES
    )
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, fresh(args), dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {first_line(exc)}") from exc


@contextlib.contextmanager
def exact_noop_rules() -> Iterator[None]:
    """onnxscript's graph optimiser without its no-op rules (``x + 0``, ``x * 1``, ``x - 0``,
    ``x / 1`` -> ``x``), while exporting.  Those rules compare the constant with a tolerance
    (``abs_tol=1e-8``): they drop the ``+ 1e-8`` of PointNet++'s feature propagation
    (``1 / (dist + 1e-8)``), so a point that coincides with a sampled one gets ``1/0`` weights and NaN
    features (VoteNet, caught by validation).  The remaining rules are unchanged."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _no_op

    saved = rewriter._DEFAULT_REWRITE_RULES
    no_op = set(_no_op.rules.rules)
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if r not in no_op)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def export_onnx(
    module: ModuleType, program, path: Path, iree_copy: Path | None = None, onnxruntime: bool = True
) -> tuple[list[str], list[str], int]:
    """Write the program's ONNX graph to ``path``; return the CPU graph forms applied to it
    (``codegen.graph_forms``: the runtime-neutral ones, then onnxruntime's own, which only
    ``onnxruntime`` graphs get) and its default-domain opset: ``ONNX_OPSET``, or more where native
    nodes need it (DeformConv: 19). ``iree_copy``: also write the graph there as it is before
    onnxruntime's forms (IREE's copy of the same program)."""
    import onnx

    # onnxscript's graph optimiser takes minutes on the large graphs of sparse-conv models
    # (SECOND: 3/4 of a ~150 s CPU conversion); onnxruntime and IREE optimise anyway.  Nodes are
    # counted in nested graphs too: SECOND's encoder is a wrap_with_autocast body, 225 top-level
    # nodes of 3223
    optimize = graph_size(program) <= OPTIMIZE_MAX_NODES
    try:
        with exact_noop_rules():
            torch.onnx.export(
                program,
                (),
                str(path),
                dynamo=True,
                optimize=optimize,
                opset_version=ONNX_OPSET,
                custom_translation_table=native.translation_table(),
                output_names=list(module.OUTPUT_NAMES),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from exc
    model = onnx.load(str(path))
    natives = native.require_opsets(model)  # e.g. DeformConv: opset 19 (codegen.ops.native)
    rename = symbol_names(module, program)
    for value in list(model.graph.input) + list(model.graph.output):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.shape_inference.InferenceError:
        # strict shape inference disagrees with the exporter's own shape annotations in some
        # nested graphs (SECOND's boxes export: a CastLike inside the autocast body, rank 0 vs 1);
        # the structural check still applies, and validation runs the graph against eager
        onnx.checker.check_model(model)
    # the CPU graph forms (codegen/graph_forms.py: deconvolutions as MatMuls, split heads, folded
    # BatchNorms, ...): onnxruntime runs PointPillars 12 % faster, IREE needs the deconvolution
    # form (docs/iree.md); validation checks the result against eager
    forms = cpu_forms(model)
    if forms:
        onnx.checker.check_model(model)
    forms += [f"native {op} nodes (codegen.ops.native)" for op in natives]
    if iree_copy is not None:
        onnx.save(model, str(iree_copy))
    # deconvolutions as onnxruntime's NCHWc 1x1 Convs (IREE keeps their MatMul form)
    own = onnxruntime_forms(model) if onnxruntime else []
    if own:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return forms, own, max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_size(program) -> int:
    """Nodes of the program's graph and of every graph nested in it (higher-order-op bodies)."""
    return sum(len(m.graph.nodes) for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule))


def same_program(a, b) -> bool:
    """Whether two exports of one wrapper are the same program: the same code in every graph
    (nested bodies included) and equal lifted constants."""
    def code(p):
        return [m.code for m in p.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]

    if code(a) != code(b) or a.constants.keys() != b.constants.keys():
        return False
    return all(
        not isinstance(v, torch.Tensor) or (v.shape == b.constants[k].shape and torch.equal(v, b.constants[k]))
        for k, v in a.constants.items()
    )


def symbol_names(module: ModuleType, program) -> dict[str, str]:
    """torch's shape symbols (``s49``) -> our dim names (``num_voxels``)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in module.INPUT_NAMES]
    by_name = {n.name: n.meta["val"].shape for n in placeholders}
    rename = {}
    for dim, members in module.DYNAMIC_DIMS.items():
        for name, axis in members.items():
            if name in by_name:
                rename[str(by_name[name][axis])] = dim
    return rename


def predicted_boxes(model, s: smp.Sample, context=contextlib.nullcontext) -> list[np.ndarray]:
    """The original ``model.predict`` on the sample (run inside ``context()``, e.g. the patches of
    a recipe with ``reference="patched"``): boxes, scores, labels in canonical order."""
    with torch.no_grad(), context():
        pred = model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])[0].pred_instances_3d
    return canonical_boxes(pred.bboxes_3d.tensor.numpy(), pred.scores_3d.numpy(), pred.labels_3d.numpy())


def canonical_boxes(bboxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Sort by score (descending), ties by label and box values: a total order for comparison."""
    keys = [bboxes[:, i] for i in reversed(range(bboxes.shape[1]))] + [labels, -scores]
    order = np.lexsort(keys)
    return [bboxes[order], scores[order], labels[order]]


def valid_boxes_by_score(outputs) -> list[np.ndarray]:
    """Padded (bboxes, scores, labels, count) -> the valid rows in canonical order."""
    bboxes, scores, labels, count = (np.asarray(o.detach().cpu() if hasattr(o, "detach") else o) for o in outputs)
    n = int(count)
    return canonical_boxes(bboxes[:n], scores[:n], labels[:n])


def iree_static(module: ModuleType, iree: IreeOptions, args) -> tuple[dict, str | None]:
    """``--iree-static N``: every dynamic dim pinned to N rows, and how inputs are padded to it."""
    if iree.static is None or not module.DYNAMIC_DIMS:
        return {}, None
    padding = padding_rule(module.PATCHES, module.INPUT_NAMES)
    if padding is None:
        raise ExportError(
            f"--iree-static is not offered for recipe {module.RECIPE}: its inputs cannot be padded without "
            "changing its outputs (see docs/iree.md)"
        )
    static = {dim: {"size": iree.static, "inputs": dict(members)} for dim, members in module.DYNAMIC_DIMS.items()}
    for dim, members in module.DYNAMIC_DIMS.items():
        name, axis = next(iter(members.items()))
        largest = max(int(a[module.INPUT_NAMES.index(name)].shape[axis]) for a in args)
        if largest > iree.static:
            raise ExportError(f"--iree-static {iree.static} is smaller than the sample's {dim} ({largest})")
    return static, padding


def compile_iree(out: Path, module: ModuleType, iree: IreeOptions, static: dict, padding: str | None) -> Compiled:
    try:
        return compile_onnx(out / IREE_ONNX, out / "model.vmfb", iree.preset, static, padding)
    except ExportError as exc:
        hint = ""
        if not static and module.DYNAMIC_DIMS and padding_rule(module.PATCHES, module.INPUT_NAMES):
            hint = f" (dynamic {', '.join(module.DYNAMIC_DIMS)}; --iree-static N compiles for a fixed size instead)"
        raise ExportError(f"IREE: {exc}{hint}") from exc


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """A staging folder beside ``output_dir``; its files move in only if the block succeeds."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if not output_dir.exists():
            os.rename(staging, output_dir)
        else:
            for item in sorted(staging.iterdir()):
                os.replace(item, output_dir / item.name)
            staging.rmdir()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_export(
    wrapper_path: Path,
    output_dir: Path,
    fmt: str = "both",
    checkpoint: str | None = None,
    device: str = "cpu",
    steps: Steps | None = None,
    generated: Generated | None = None,
    iree: IreeOptions | None = None,
) -> dict:
    """Export the wrapper at ``wrapper_path``; reuse the one-shot's model and samples if given."""
    steps = steps or Steps()
    formats = parse_formats(fmt)
    iree = iree or IreeOptions()
    module = import_wrapper(wrapper_path)
    if module.RECIPE not in BY_NAME:
        raise ExportError(f"wrapper names an unknown recipe {module.RECIPE!r}")
    if generated is None:
        resolved = resolve_config(module.CONFIG)
        if resolved.sha256 != module.CONFIG_SHA256:
            steps.warn(f"warning: {module.CONFIG} changed since {Path(wrapper_path).name} was generated; regenerate it")
        model = smp.load_model(module.CONFIG, checkpoint, device, steps.warn)
        recipe = recipe_for(model.cfg.model)
        if recipe.name != module.RECIPE:
            raise ExportError(f"{Path(wrapper_path).name} is stale: recipe {module.RECIPE}, config now needs {recipe.name}")
        samples = [smp.sample_frame(model, module.FRAME, v, steps.warn) for v in (0, 1)]
        analysis = analyse_inputs(model, recipe, samples)
        mode = getattr(module, "OUTPUTS", "head")
        analysis.outputs = analyse_outputs(model, recipe, samples[0], analysis.batch_size, mode)
        config_ref, frame = module.CONFIG, module.FRAME
    else:
        model, samples, analysis, recipe = generated.model, generated.samples, generated.analysis, generated.recipe
        config_ref, frame = generated.resolved.ref, generated.frame
    if [t.name for t in analysis.used_inputs] != list(module.INPUT_NAMES):
        raise ExportError(f"{Path(wrapper_path).name} is stale: its inputs differ from the sample's; regenerate it")
    wrapper = module.ExportWrapper(model).eval()
    args = [input_args(module, module.flat_inputs(s.data)) for s in samples]
    static, padding = iree_static(module, iree, args) if "iree" in formats else ({}, None)
    compiled, onnx_forms, opset, iree_opset = None, None, None, None

    with staged_output(output_dir) as out:
        shutil.copyfile(wrapper_path, out / Path(wrapper_path).name)
        with steps.step(8, "+".join(formats)):
            runtimes: list[Runtime] = []
            program = None
            if "pt2" in formats or "onnx" in formats:
                # sequential loops (FPS, NMS) as one ONNX Scan each, windowed ball queries and
                # TopK sorts: the forms onnxruntime runs fastest
                with export_forms(iree=False):
                    program = export_program(module, wrapper, args[0])
                steps.detail(f"graph: {graph_size(program)} nodes; dynamic: {module.DYNAMIC_DIMS}")
            if "pt2" in formats:
                # the tensor-op forms of the ops model.onnx holds as native ONNX nodes: a PT2
                # loads in plain torch
                torch.export.save(native.decomposed(program), str(out / "model.pt2"))
                reloaded = torch.export.load(str(out / "model.pt2")).module()
                runtimes.append(Runtime("pt2", lambda a, m=reloaded: m(*a)))
            shared = False  # IREE's program is model.onnx's: IREE_ONNX is written by that export
            if "iree" in formats:
                # IREE's own forms (codegen.ops.points.export_forms): loops unrolled (IREE 3.13
                # miscompiles Scan), no data-dependent sizes, radix sorts; a second ONNX export,
                # kept beside the vmfb as IREE_ONNX, unless the forms change nothing in this model
                # (then IREE_ONNX is model.onnx before onnxruntime's own forms)
                with export_forms(iree=True):
                    iree_program = export_program(module, wrapper, args[0])
                shared = "onnx" in formats and same_program(program, iree_program)
            if "onnx" in formats:
                neutral_forms, own_forms, opset = export_onnx(
                    module, program, out / "model.onnx", iree_copy=out / IREE_ONNX if shared else None
                )
                onnx_forms = neutral_forms + own_forms
                steps.detail(f"onnx: {len(onnx_forms)} graph forms (metadata.json onnx_graph_forms)")
                runtimes.append(onnx_runtime(out / "model.onnx", module.INPUT_NAMES))
            if "iree" in formats:
                if shared:
                    iree_forms, iree_opset = neutral_forms, opset
                else:
                    steps.detail(f"iree graph: {graph_size(iree_program)} nodes")
                    iree_forms, _, iree_opset = export_onnx(module, iree_program, out / IREE_ONNX, onnxruntime=False)
                compiled = compile_iree(out, module, iree, static, padding)
                compiled.onnx_forms = iree_forms
                runtimes.append(iree_runtime(out / "model.vmfb", module.INPUT_NAMES, static, padding))
                steps.detail(
                    f"iree: preset {compiled.preset}{f', static {static}' if static else ''}, "
                    f"{len(compiled.rewrites)} graph rewrites (metadata.json iree.graph_rewrites); "
                    f"import {compiled.import_s:.1f} s, compile {compiled.compile_s:.1f} s"
                )
        with steps.step(9):
            if getattr(module, "OUTPUTS", "head") == "boxes":
                report = validate(
                    wrapper,
                    runtimes,
                    args,
                    BOX_OUTPUTS[:3],
                    recipe.atol,
                    recipe.rtol,
                    reference=lambda i: predicted_boxes(
                        model, samples[i], lambda: predict_context(recipe, analysis.batch_size)
                    ),
                    normalize=valid_boxes_by_score,
                    reference_name=recipe.reference,
                )
            else:
                reselect = None
                if recipe.reselect is not None:
                    reselect = lambda a, got, ref: recipe.reselect(  # noqa: E731
                        wrapper, module.OUTPUT_NAMES, a, got, ref, recipe.atol, recipe.rtol
                    )
                report = validate(
                    wrapper,
                    runtimes,
                    args,
                    module.OUTPUT_NAMES,
                    recipe.atol,
                    recipe.rtol,
                    reference_name=recipe.reference,
                    reselect=reselect,
                )
            text = render_report(report)
            (out / "validation.txt").write_text(text)
        np.savez(out / "inputs.npz", **{n: a.cpu().numpy() for n, a in zip(module.INPUT_NAMES, args[0])})
        meta = build_metadata(
            config_ref=config_ref,
            checkpoint=checkpoint,
            model=model,
            recipe=recipe,
            analysis=analysis,
            frame=frame,
            samples=samples,
            formats=formats,
            opset=opset if "onnx" in formats else iree_opset if "iree" in formats else None,
            onnx_forms=onnx_forms,
            iree=compiled.to_json() if compiled else None,
            report=report,
            wrapper_file=Path(wrapper_path).name,
            timings=steps.timings,
        )
        (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        steps.info(text)
        if not report["passed"]:
            raise ValidationFailed(f"validation failed: {report['summary']} (outputs not written)")
    return meta
