"""Step 9: run the eager model and every exported runtime on fresh copies of the same inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


# validation reference -> how the report names it
REFERENCES = {
    "original": "original eager model",
    "patched": "patched eager model (reference 'patched': the original cannot run on this device)",
}


def within_tolerance(x, ref, atol: float, rtol: float) -> np.ndarray:
    """Elementwise ``|x - ref| <= atol + rtol * |ref|`` in float64: the one closeness rule of the
    validation and of every recipe's ``reselect`` (which decides whether scores tie)."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.abs(x - ref) <= atol + rtol * np.abs(ref)


@dataclass
class Runtime:
    name: str
    run: Callable[[tuple[torch.Tensor, ...]], Sequence]  # positional inputs -> outputs


# onnxruntime session settings of every session the tool (and its bench) opens; recorded in
# metadata.json (``runtime_options.onnxruntime``) for whoever deploys model.onnx
ORT_CONFIG = {
    # flush denormal floats to zero (FTZ/DAZ on onnxruntime's threads). Swin's shifted-window
    # masks (-100 before the softmax) and random-weight activations give operands below 1.2e-38,
    # on which x86 multiplies take microcode assists: BEVFusion's camera graph spent 1.8 s of one
    # thread in one 2.8 GFLOP MatMul. A denormal is below any tolerance the outputs are held to.
    "session.set_denormal_as_zero": "1",
}


def ort_session(path: Path | str, threads: int | None = None, profile_prefix: str | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` with ``ORT_CONFIG`` (``threads``:
    intra-op threads, default onnxruntime's; ``profile_prefix``: turn on its profiler)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in ORT_CONFIG.items():
        opts.add_session_config_entry(key, value)
    if threads is not None:
        opts.intra_op_num_threads = threads
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_runtime(path: Path, input_names: Sequence[str]) -> Runtime:
    session = ort_session(path)

    def run(args: tuple[torch.Tensor, ...]):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args)}
        return session.run(None, feeds)

    return Runtime("onnx", run)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The reference runs on one thread: spconv's CPU kernels race with more (two runs of one
    sparse layer on the nuScenes grid differ by 1.8e-2 with 2 threads), mmcv's may too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def validate(
    wrapper: torch.nn.Module,
    runtimes: list[Runtime],
    samples: list[tuple[torch.Tensor, ...]],
    output_names: Sequence[str],
    atol: float,
    rtol: float,
    reference: Callable[[int], list] | None = None,
    normalize: Callable[[Sequence], list] | None = None,
    reference_name: str = "original",
    reselect: Callable[[tuple, Sequence, list], Sequence | None] | None = None,
) -> dict:
    """Compare each runtime with the original eager model (patches off) on every sample.

    The patched eager wrapper is checked too: it proves the export patches keep the numerics.
    ``reference_name="patched"`` makes the patched eager wrapper the reference instead (for
    models whose original cannot run here, e.g. an mmcv op without a CPU kernel); its own row
    then only shows that it is deterministic. The name is recorded in the report.
    A shape mismatch fails; values pass when ``|x - ref| <= atol + rtol * |ref|`` everywhere.
    ``reference(i)`` replaces the eager wrapper as the reference for sample i (e.g. the original
    ``model.predict`` for decoded boxes) and ``normalize`` maps each runtime's raw outputs to the
    compared arrays (e.g. padded boxes -> valid rows sorted by score).
    ``reselect(args, outputs, reference)`` is for outputs that hang on a discrete choice among
    (nearly) tied scores (TransFusion's top-k queries): the reference's raw outputs recomputed with
    the runtime's choice when that differs but is valid, else None; such rows say "reselected".
    """
    normalize = normalize or (lambda outs: [_np(o) for o in outs])
    eager_patched = Runtime("eager-patched", lambda a: wrapper(*a))
    rows = []
    for index, args in enumerate(samples):
        with torch.no_grad(), one_thread():
            if reference is not None:
                ref_outputs = [_np(o) for o in reference(index)]
            elif reference_name == "patched":
                ref_outputs = normalize(wrapper(*[a.clone() for a in args]))
            else:
                wrapper.patched = False
                try:
                    ref_outputs = normalize(wrapper(*[a.clone() for a in args]))
                finally:
                    wrapper.patched = True
            for runtime in [eager_patched, *runtimes]:
                raw = runtime.run(tuple(a.clone() for a in args))
                got = normalize(raw)
                runtime_ref, reselected = ref_outputs, None
                if reselect is not None:
                    reselected = reselect(tuple(a.clone() for a in args), got, ref_outputs)
                    if reselected is not None:
                        runtime_ref = normalize(reselected)
                for name, ref, out in zip(output_names, runtime_ref, got):
                    row = {
                        "sample": index,
                        "size": int(args[0].shape[0]),
                        "runtime": runtime.name,
                        "output": name,
                        "shape": list(out.shape),
                        "ref_shape": list(ref.shape),
                    }
                    if reselected is not None:
                        row["reselected"] = True
                    if out.shape != ref.shape:
                        row.update(max_abs_diff=None, ok=False)
                    else:
                        out64, ref64 = out.astype(np.float64), ref.astype(np.float64)  # converted once
                        diff = np.abs(out64 - ref64)
                        ok = bool(within_tolerance(out64, ref64, atol, rtol).all())
                        row.update(max_abs_diff=float(diff.max()) if diff.size else 0.0, ok=ok)
                    rows.append(row)
                if len(got) != len(ref_outputs):
                    rows.append({"sample": index, "runtime": runtime.name, "output": "<count>", "ok": False})
    failed = [r for r in rows if not r["ok"]]
    worst = {}
    for r in rows:
        if r.get("max_abs_diff") is not None:
            # max() that keeps a NaN (Python's max(0.0, nan) is 0.0): a NaN output must show
            worst[r["runtime"]] = max(worst.get(r["runtime"], 0.0), r["max_abs_diff"], key=lambda v: (v != v, v))
    summary = f"{len(rows) - len(failed)}/{len(rows)} checks passed; max abs diff " + ", ".join(
        f"{k} {v:.3g}" for k, v in worst.items()
    )
    return {
        "passed": not failed,
        "reference": reference_name,
        "atol": atol,
        "rtol": rtol,
        "rows": rows,
        "max_abs_diff": worst,
        "summary": summary,
    }


def render_report(report: dict) -> str:
    lines = [
        f"validation against the {REFERENCES[report.get('reference', 'original')]}"
        f" (atol {report['atol']:g}, rtol {report['rtol']:g})",
        f"{'sample':<7}{'size':>7}  {'runtime':<14}{'output':<16}{'shape':<22}{'max abs diff':>14}  ok",
    ]
    for r in report["rows"]:
        diff = "shape!" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.3g}"
        lines.append(
            f"{r['sample']:<7}{r.get('size', ''):>7}  {r['runtime']:<14}{r['output']:<16}{str(r.get('shape', '')):<22}"
            f"{diff:>14}  {'✓' if r['ok'] else '✗'}"
        )
    reselected = sorted({(r["runtime"], r["sample"]) for r in report["rows"] if r.get("reselected")})
    if reselected:
        lines.append(
            "reselected: the reference was re-run with the choices the runtime made among tied scores for "
            + ", ".join(f"{runtime} sample {sample}" for runtime, sample in reselected)
        )
    lines.append(("PASSED: " if report["passed"] else "FAILED: ") + report["summary"])
    return "\n".join(lines) + "\n"
