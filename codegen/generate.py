"""Stage 1 (steps 1-7): config + checkpoint + frame -> generated/wrapper_<model>.py source."""

from __future__ import annotations

import contextlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from . import sample as smp
from .boxes import BOX_OUTPUTS
from .analyze import Analysis, analyze, analyze_outputs
from .configs import ResolvedConfig, resolve_config
from .errors import ExportError
from .progress import Steps
from .recipes import Recipe, recipe_for
from .render import render_wrapper

GENERATED = Path(__file__).resolve().parent.parent / "generated"


@dataclass
class Generated:
    resolved: ResolvedConfig
    recipe: Recipe
    model: torch.nn.Module
    analysis: Analysis
    frame: str | None  # the recorded frame reference
    samples: list[smp.Sample]  # the sample and its variant
    source: str
    outputs: str = "head"

    @property
    def model_name(self) -> str:
        return wrapper_name(self.resolved, self.outputs)


def wrapper_name(resolved: ResolvedConfig, outputs: str = "head") -> str:
    name = re.sub(r"\W+", "_", resolved.stem).strip("_").lower()
    return name if outputs == "head" else f"{name}_{outputs}"


def default_wrapper_path(resolved: ResolvedConfig, outputs: str = "head") -> Path:
    return GENERATED / f"wrapper_{wrapper_name(resolved, outputs)}.py"


def regenerate_command(config_ref: str, frame: str | None, default_frame: str | None, outputs: str) -> str:
    cmd = ["python", "-m", "codegen", "generate", "--config", config_ref]
    if frame != default_frame:
        cmd += ["--frame", frame if frame is not None else "synthetic"]
    if outputs != "head":
        cmd += ["--outputs", outputs]
    return shlex.join(cmd)


def _eval_as_wrapper(expression: str, model, **names):
    """Evaluate a recipe expression (written for the wrapper's forward, ``self.model...``) eagerly,
    so generation runs exactly the code the wrapper will hold."""
    from types import SimpleNamespace

    from . import boxes, patches

    patches._load_all()  # the wrapper's forward has them loaded (patches.applied) when it calls
    return eval(expression, {"boxes": boxes, "patches": patches}, {"self": SimpleNamespace(model=model), **names})


def decode_boxes(model, recipe: Recipe, head_outputs):
    """Run the recipe's box decoder eagerly."""
    return _eval_as_wrapper(recipe.boxes, model, head_outputs=head_outputs)


def generate(
    config: str,
    checkpoint: str | None = None,
    frame: str | None = None,
    device: str = "cpu",
    steps: Steps | None = None,
    outputs: str = "head",
) -> Generated:
    steps = steps or Steps()
    with steps.step(1):
        resolved = resolve_config(config)
        if resolved.note:
            steps.info(f"note: {resolved.note}")
        cfg = smp.load_config(resolved, steps.detail)
        recipe = recipe_for(cfg.model)
        if outputs == "boxes" and recipe.boxes is None:
            raise ExportError(f"--outputs boxes is not available for recipe {recipe.name} yet (head outputs are)")
        steps.detail(f"{resolved.path} -> recipe {recipe.name}")
    with steps.step(2, str(cfg.model.get("type"))):
        model = smp.build_model(cfg, device, steps.detail)
        steps.detail(f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}")
    if checkpoint:
        with steps.step(3):
            smp.load_weights(model, checkpoint, steps.warn)
    else:
        steps.skip(3, "no --checkpoint: random weights")

    with steps.step(4):
        default = smp.default_frame_ref(cfg)
        ref = None if frame == "synthetic" else smp.frame_ref(frame, cfg)
        samples = [smp.sample_frame(model, ref, variant, steps.warn) for variant in (0, 1)]
        for s in samples:
            steps.detail(f"{s.frame}: {s.num_raw_points} points")

    with steps.step(5):
        analysis = analyse_inputs(model, recipe, samples)
        for t in analysis.used_inputs:
            steps.detail(f"{t.name:<12} {t.path:<28} {t.symbolic_shape} {t.dtype}")
    with steps.step(6):
        analysis.outputs = analyse_outputs(model, recipe, samples[0], analysis.batch_size, outputs)
        for spec in analysis.outputs:
            steps.detail(f"{spec.name:<14} {spec.shape} {spec.dtype}")
    with steps.step(7):
        source = render_wrapper(
            analysis=analysis,
            recipe=recipe,
            config_ref=resolved.ref,
            config_sha256=resolved.sha256,
            model_type=type(model).__name__,
            frame=ref,
            command=regenerate_command(resolved.ref, ref, default, outputs),
            outputs=outputs,
        )
    return Generated(resolved, recipe, model, analysis, ref, samples, source, outputs)


def analyse_inputs(model, recipe: Recipe, samples: list[smp.Sample]) -> Analysis:
    """Step 5: describe the sample (the variant tells the dynamic axes); check the recipe's inputs."""
    channels = smp.point_channels(model.cfg)
    analysis = analyze(samples[0].data, samples[1].data, recipe.inputs, channels)
    used = [t.path for t in analysis.used_inputs]
    missing = [p for p in recipe.inputs if not any(u == p or u.startswith(p + ".") for u in used)]
    if missing:
        raise ExportError(f"the sample has no {sorted(missing)} for recipe {recipe.name}")
    return analysis


def analyse_outputs(model, recipe: Recipe, s: smp.Sample, batch_size: int, outputs: str = "head") -> list:
    """Step 6: run the reference once and describe its head outputs (or the decoded boxes)."""
    head_outputs = _run_once(model, recipe, s, batch_size)
    if outputs == "boxes":
        with torch.no_grad():
            decoded = decode_boxes(model, recipe, head_outputs)
        return analyze_outputs(decoded, BOX_OUTPUTS, root="decoded")
    return analyze_outputs(head_outputs, recipe.output_groups, descriptions=recipe.output_descriptions)


def run_tensor_path(model, recipe: Recipe, inputs: dict):
    """The recipe's call (the model's tensor path), under whatever patches the caller applied."""
    return _eval_as_wrapper(recipe.call, model, batch_inputs_dict=inputs)


def reference_context(recipe: Recipe, batch_size: int):
    """What the reference runs under: nothing for the original model; the recipe's patches when
    the original cannot run here (``recipe.reference == "patched"``)."""
    if recipe.reference == "patched":
        from . import patches

        return patches.applied(recipe.patches, batch_size=batch_size)
    return contextlib.nullcontext()


def predict_context(recipe: Recipe, batch_size: int):
    """What mmdet3d's full ``model.predict`` runs under: the recipe's ``predict_patches`` when it
    has them, also for a recipe whose tensor path runs the original (Part-A2: its RoI stage,
    which the export leaves out, pools with a CUDA-only mmcv op); else ``reference_context``."""
    if recipe.predict_patches is not None:
        from . import patches

        return patches.applied(recipe.predict_patches, batch_size=batch_size)
    return reference_context(recipe, batch_size)


def _run_once(model, recipe: Recipe, s: smp.Sample, batch_size: int):
    """The reference tensor path (the original model's, or the patched one for a recipe with
    ``reference="patched"``) on a copy of the sample (the model may write into it)."""
    inputs = smp.clone_tree(s.data["inputs"])
    with torch.no_grad(), reference_context(recipe, batch_size):
        try:
            outputs = run_tensor_path(model, recipe, inputs)
        except Exception as exc:
            raise ExportError(f"the model failed on the sample: {type(exc).__name__}: {exc}") from None
    bad = [t for t in smp.tensors(outputs) if not torch.isfinite(t).all()]
    if bad:
        raise ExportError(f"the model gives non-finite outputs on the sample ({len(bad)} tensors)")
    return outputs
