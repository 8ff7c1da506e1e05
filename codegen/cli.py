"""Command line: ``generate``, ``export`` and the one-shot form with the original flags.

    mmdet3d-export --config NAME_OR_PATH [--checkpoint F] [--output-dir D] [--format pt2|onnx|iree|both|all]
                   [--iree-preset host|portable|default] [--iree-static N]
                   [--device cuda:0] [--source-root CHECKOUT] [--verbose]
    mmdet3d-export generate --config NAME_OR_PATH [--frame F|synthetic] [--output F] [--check]
    mmdet3d-export generate --check            # every committed wrapper under generated/
    mmdet3d-export export generated/wrapper_X.py [--checkpoint F] [--output-dir D] [--format ...]
    mmdet3d-export run EXPORT_DIR_OR_MODEL --points FILE [--format pt2|onnx|vmfb] [--output-dir D]
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import ExportError, first_line

SUBCOMMANDS = ("generate", "export", "sweep", "run")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint file (.pth); random weights when omitted")
    p.add_argument("--device", default="cuda:0", help="torch device (default cuda:0; cpu when CUDA is absent)")
    p.add_argument("--verbose", "-v", action="store_true", help="show details of every step")
    p.add_argument(
        "--source-root",
        metavar="PATH",
        help="mmdetection3d source checkout (the folder holding projects/) for project configs such as "
        "projects/BEVFusion/configs/*.py: put on sys.path before the config's custom_imports (default: the "
        "checkout holding --config, else $MMDET3D_EXPORT_SOURCE_ROOT or ../shared/third_party/mmdetection3d)",
    )


def _outputs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outputs",
        default="head",
        choices=("head", "boxes"),
        help="head: raw head tensors (default); boxes: decoded boxes padded to a fixed count",
    )


def _format(spec: str) -> str:
    from .metadata import parse_formats

    try:
        parse_formats(spec)
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _static_size(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"--iree-static needs a row count >= 2, got {text!r}")
    return int(text)


def _export_flags(p: argparse.ArgumentParser) -> None:
    from .iree import DEFAULT_PRESET, PRESETS

    p.add_argument("--output-dir", default="./exported_models", type=Path, help="default ./exported_models")
    p.add_argument(
        "--format",
        default="both",
        type=_format,
        metavar="pt2|onnx|iree|both|all",
        help="default both (pt2+onnx); all = pt2+onnx+iree; or a comma list, e.g. onnx,iree. "
        "iree exports ONNX in IREE's op forms (model.iree.onnx) and compiles it into model.vmfb (llvm-cpu)",
    )
    p.add_argument(
        "--iree-preset",
        choices=tuple(PRESETS),
        help=f"IREE flags (default {DEFAULT_PRESET}): host = tuned for this machine's CPU (the vmfb needs its "
        "instruction set), portable = tuned for any x86-64 with AVX2 (x86-64-v3), default = IREE's "
        "defaults for any x86-64 CPU (slow); see docs/iree.md",
    )
    p.add_argument(
        "--iree-static",
        type=_static_size,
        metavar="N",
        help="compile the vmfb for exactly N voxels/points (inputs padded to N; see docs/iree.md) "
        "instead of dynamic shapes",
    )


def one_shot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdet3d-export",
        description="Export an MMDetection3D model to PT2, ONNX and IREE (vmfb), validated against the eager model. "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (see 'mmdet3d-export generate -h').",
    )
    p.add_argument("--config", required=True, help="config path, shipped config name, mmdet3d::dir/file.py, or 0.x name")
    p.add_argument("--frame", help="point cloud to sample on (default: the dataset's shared frame; 'synthetic')")
    _outputs_flag(p)
    _common(p)
    _export_flags(p)
    return p


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdet3d-export generate", description="Stage 1: render generated/wrapper_<model>.py")
    p.add_argument("--config", help="config path or name (with --check and no --config: every committed wrapper)")
    p.add_argument("--frame", help="point cloud to sample on (default: the dataset's shared frame; 'synthetic')")
    p.add_argument("--output", type=Path, help="wrapper file (default generated/wrapper_<config>.py)")
    p.add_argument("--check", action="store_true", help="regenerate in memory; exit 1 with a diff if the file differs")
    _outputs_flag(p)
    _common(p)
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdet3d-export export", description="Stage 2: export and validate a wrapper")
    p.add_argument("wrapper", type=Path, help="a generated wrapper file")
    _common(p)
    _export_flags(p)
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdet3d-export sweep", description="Run every shipped config; write docs/coverage.md")
    p.add_argument("--match", nargs="*", default=[], help="only configs whose name contains one of these")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config (default 900)")
    p.add_argument("--memory-gib", type=float, default=12, help="address-space limit per config (default 12)")
    p.add_argument("--retry-failed", action="store_true", help="rerun configs recorded as failed")
    p.add_argument("--jobs", type=int, default=1, help="configs at once, each with cores/jobs threads (default 1)")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdet3d-export run",
        description="Run an exported model on a point cloud: print the boxes, write <stem>.boxes.json and a "
        "bird's-eye-view <stem>.bev.png",
    )
    p.add_argument("model", type=Path, help="an export directory (with metadata.json) or a model.pt2/.onnx/.vmfb in one")
    p.add_argument("--points", required=True, type=Path, help="point cloud file (KITTI .bin, nuScenes .pcd.bin, ...)")
    p.add_argument("--format", choices=("pt2", "onnx", "vmfb"), help="which model of the export directory (default: first present)")
    p.add_argument("--output-dir", default=Path("."), type=Path, help="where the JSON and PNG go (default .)")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .memory import one_malloc_arena

    one_malloc_arena()  # before torch, onnxruntime or IREE start threads (see codegen.memory)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = {
        "generate": generate_parser,
        "export": export_parser,
        "sweep": sweep_parser,
        "run": run_parser,
        None: one_shot_parser,
    }[command]()
    args = parser.parse_args(argv[1:] if command else argv)
    from .progress import Steps

    steps = Steps(verbose=args.verbose)
    try:
        from .sample import pick_device

        device = pick_device(args.device, steps.warn)
        if getattr(args, "source_root", None):
            from .checkout import activate

            steps.detail(f"source root: {activate(args.source_root)}")
        if command == "generate":
            return cmd_generate(args, device, steps)
        if command == "export":
            return cmd_export(args, device, steps)
        if command == "sweep":
            from .sweep import sweep

            return sweep(args.match, args.timeout, args.memory_gib, args.retry_failed, steps.info, args.jobs)
        if command == "run":
            from .run import run

            run(args.model, args.points, args.output_dir, args.format, steps.info)
            return 0
        return cmd_one_shot(args, device, steps)
    except ExportError as exc:
        if args.verbose and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        steps.console.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: one line, details with --verbose
        if args.verbose:
            traceback.print_exc()
        steps.console.print(f"[red]error:[/] internal error: {type(exc).__name__}: {first_line(exc)}", highlight=False)
        return 3


def committed_wrappers() -> list[tuple[Path, str, str | None, str]]:
    """(file, CONFIG, FRAME, OUTPUTS) of every committed wrapper, read without importing it."""
    from .generate import GENERATED

    found = []
    for path in sorted(GENERATED.glob("wrapper_*.py")):
        values = {}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id in ("CONFIG", "FRAME", "OUTPUTS"):
                    values[node.targets[0].id] = ast.literal_eval(node.value)
        found.append((path, values["CONFIG"], values.get("FRAME"), values.get("OUTPUTS", "head")))
    return found


def cmd_generate(args, device: str, steps) -> int:
    from . import checkout
    from .configs import resolve_config
    from .generate import default_wrapper_path, generate
    from .render import diff, write_if_changed

    if args.config:
        target = args.output or default_wrapper_path(resolve_config(args.config), args.outputs)
        jobs = [(target, args.config, args.frame, args.outputs)]
    elif args.check:
        jobs = [(p, config, frame or "synthetic", outputs) for p, config, frame, outputs in committed_wrappers()]
        if not jobs:
            raise ExportError("no committed wrappers under generated/")
    else:
        raise ExportError("generate needs --config (or --check alone to check every committed wrapper)")
    stale = 0
    for target, config, frame, outputs in jobs:
        if not args.config and checkout.is_missing(config):
            steps.warn(f"skipped: {target} ({config} is in an mmdetection3d checkout that is not here: --source-root)")
            continue
        result = generate(config, args.checkpoint, frame, device, steps, outputs)
        if args.check:
            old = target.read_text() if target.is_file() else ""
            if old != result.source:
                stale += 1
                sys.stdout.write(diff(old, result.source, str(target)))
                steps.warn(f"stale: {target} (regenerate: {_regen_hint(result)})")
            else:
                steps.info(f"up to date: {target}")
        else:
            changed = write_if_changed(target, result.source)
            steps.info(f"{'wrote' if changed else 'unchanged'}: {target}")
    return 1 if stale else 0


def _regen_hint(result) -> str:
    for line in result.source.splitlines()[:3]:
        if "Regenerate: " in line:
            return line.split("Regenerate: ", 1)[1]
    return "python -m codegen generate --config ..."


def _iree(args):
    """The IREE options; IREE flags without ``iree`` in ``--format`` are a mistake worth one line."""
    from .iree import DEFAULT_PRESET, IreeOptions
    from .metadata import parse_formats

    if "iree" not in parse_formats(args.format):
        given = [flag for flag, value in (("--iree-preset", args.iree_preset), ("--iree-static", args.iree_static)) if value]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ExportError(f"{' and '.join(given)} {verb} --format iree (or all, or a list with iree)")
    return IreeOptions(args.iree_preset or DEFAULT_PRESET, args.iree_static)


def _peak_rss() -> str:
    """This process's peak resident memory (what an export needs; ``sweep`` records it)."""
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def cmd_export(args, device: str, steps) -> int:
    from .export import run_export

    iree = _iree(args)
    meta = run_export(args.wrapper, args.output_dir, args.format, args.checkpoint, device, steps, iree=iree)
    steps.info(f"wrote {args.output_dir}: {', '.join(meta['formats'].values())}, metadata.json; {_peak_rss()}")
    return 0


def cmd_one_shot(args, device: str, steps) -> int:
    from .export import run_export
    from .generate import generate

    iree = _iree(args)
    result = generate(args.config, args.checkpoint, args.frame, device, steps, args.outputs)
    with tempfile.TemporaryDirectory(prefix="mmdet3d-export-") as tmp:
        wrapper = Path(tmp) / f"wrapper_{result.model_name}.py"
        wrapper.write_text(result.source)
        meta = run_export(
            wrapper, args.output_dir, args.format, args.checkpoint, device, steps, generated=result, iree=iree
        )
    steps.info(f"wrote {args.output_dir}: {', '.join(meta['formats'].values())}, metadata.json, {wrapper.name}; {_peak_rss()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
