"""Zoo sweep: generate + export + validate every shipped config, one subprocess each.

    mmdet3d-export sweep [--match SUBSTRING ...] [--timeout 900] [--memory-gib 12] [--retry-failed] [--jobs N]

Each config runs the one-shot command in its own process with a wall-time and an address-space
limit; ``--jobs N`` runs N at once, each with cores/N threads (much of an export is single-threaded
Python: the ONNX conversion, the tracing), so 2 jobs on 2 cores finish sooner than 1. Results
are appended to ``docs/coverage.json`` as they come (a rerun resumes and skips what is there), then ``docs/coverage.md`` is rewritten: one row per config and the failures
grouped by cause.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

# detectors whose configs are segmentation-only (out of scope for box export)
SEGMENTORS = {"EncoderDecoder3D", "Cylinder3D", "MinkUNet", "SPVCNN", "MinkUNetWeightedNoCRF"}


def list_configs() -> list[tuple[str, str, str]]:
    """(config name, family folder, model type) of every shipped config, sorted, then the
    configs of the source checkout's projects (BEVFusion; ``codegen.checkout.default_root``,
    named by their path in the checkout, which ``--config`` takes) when that checkout is there."""
    from mmengine.config import Config

    from .checkout import default_root
    from .configs import shipped_config_root

    def model_type(path: Path) -> str:
        try:  # the projects' custom_imports are not importable here, nor needed for the type
            return str(Config.fromfile(str(path), import_custom_modules=False).model.get("type"))
        except Exception as exc:  # a config that does not even load is a result too
            return f"unloadable: {type(exc).__name__}"

    found = []
    for path in sorted(shipped_config_root().glob("*/*.py")):
        if not path.parent.name.startswith("_"):
            found.append((path.stem, path.parent.name, model_type(path)))
    root = default_root()
    for path in sorted(root.glob("projects/*/configs/*.py")):
        found.append((str(path.relative_to(root)), f"projects/{path.parts[-3]}", model_type(path)))
    return found


def _limits(memory_gib: float):
    def apply() -> None:
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_one(config: str, timeout: float, memory_gib: float, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "codegen", "--config", config, "--output-dir", str(out), "--device", "cpu"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads) if threads else os.environ.get("OMP_NUM_THREADS", "2"))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_limits(memory_gib), env=env, cwd=REPO
            )
            stderr, code = proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stderr = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            stderr += f"\nerror: timed out after {timeout:.0f} s"
            code = -1
        wall = time.perf_counter() - start
        meta = json.loads((out / "metadata.json").read_text()) if (out / "metadata.json").is_file() else None
    errors = [line[len("error: ") :] for line in stderr.splitlines() if line.startswith("error: ")]
    if code not in (0, -1) and not errors:
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        errors = [f"crashed (exit {code}): {tail[-1][:200] if tail else 'no output'}"]
    done = lambda step: f"[{step}/9]" in stderr and f"✓ [{step}/9]" in stderr
    error = errors[-1] if errors else None
    row = {
        "config": config,
        "ok": code == 0,
        "wrapper": done(7),
        "pt2": done(8) or (error is not None and error.startswith("ONNX export failed")),
        "onnx": done(8),
        "parity": (meta or {}).get("validation", {}).get("max_abs_diff"),
        "error": error,
        "wall_s": round(wall, 1),
        "peak_rss_gib": float(rss[-1]) if (rss := re.findall(r"peak RSS ([0-9.]+) GiB", stderr)) else None,
    }
    return row


def _package_paths(error: str) -> str:
    """An error line with installed files named by their package path (not this machine's venv)."""
    return re.sub(r"\S*/site-packages/", "", error)


def cause(error: str | None) -> str:
    """An error line without its specifics, for grouping."""
    if not error:
        return ""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", _package_paths(error))
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text[:140]


def write_report(rows: list[dict], kinds: dict[str, tuple[str, str]]) -> Path:
    DOCS.mkdir(exist_ok=True)
    detection = [r for r in rows if kinds.get(r["config"], ("", ""))[1] not in SEGMENTORS]
    passed = [r for r in detection if r["ok"]]
    rate = 100.0 * len(passed) / len(detection) if detection else 0.0
    mark = lambda b: "✓" if b else "✗"
    lines = [
        "# Coverage of the mmdet3d 1.4.0 config zoo",
        "",
        "Written by `mmdet3d-export sweep` (one subprocess per config: generate + PT2 + ONNX export +",
        "validation against the eager model on two point counts, CPU).",
        "",
        f"**{len(passed)} / {len(detection)} detection configs pass ({rate:.0f} %)**; "
        f"{len(rows) - len(detection)} segmentation configs listed but out of scope.",
        "",
    ]
    total = sum(1 for _, model in kinds.values() if model not in SEGMENTORS)
    if len(detection) < total:
        lines += [
            f"**Partial sweep: {len(detection)} of {total} detection configs recorded so far** "
            "(rerun `mmdet3d-export sweep` to resume; the pass rate above is over the recorded ones).",
            "",
        ]
    lines += [
        "## Failures by cause",
        "",
        "| configs | cause |",
        "|---:|---|",
    ]
    for text, n in Counter(cause(r["error"]) for r in detection if not r["ok"]).most_common():
        lines.append(f"| {n} | {text} |")
    lines += [
        "",
        "## All configs",
        "",
        "Wall time: the whole subprocess (generate, export, validation) on this 2-core machine, with",
        "`--jobs` configs at a time; peak RSS: the export process's (recorded since 2026-12-02).",
        "",
        "| config | family | model | wrapper | PT2 | ONNX | parity max diff | wall s | peak RSS GiB | failure |",
    ]
    lines.append("|---|---|---|:-:|:-:|:-:|---|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (kinds.get(r["config"], ("", ""))[0], r["config"])):
        family, model = kinds.get(r["config"], ("?", "?"))
        parity = ", ".join(f"{k} {v:.2g}" for k, v in (r["parity"] or {}).items() if k != "eager-patched")
        error = _package_paths(r["error"] or "").replace("|", "\\|")[:160]
        lines.append(
            f"| {r['config']} | {family} | {model} | {mark(r['wrapper'])} | {mark(r['pt2'])} | {mark(r['onnx'])} "
            f"| {parity} | {r['wall_s'] or ''} | {r.get('peak_rss_gib') or ''} | {error} |"
        )
    path = DOCS / "coverage.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(matches: list[str], timeout: float, memory_gib: float, retry_failed: bool, log=print, jobs: int = 1) -> int:
    state = DOCS / "coverage.json"
    rows: dict[str, dict] = {}
    if state.is_file():
        rows = {r["config"]: r for r in json.loads(state.read_text())["results"]}
    configs = list_configs()
    kinds = {name: (family, model) for name, family, model in configs}
    todo = [
        name
        for name, _, model in configs
        if (not matches or any(m in name for m in matches))
        and model not in SEGMENTORS
        and (name not in rows or (retry_failed and not rows[name]["ok"]))
    ]
    for name, _, model in configs:
        if model in SEGMENTORS and name not in rows:
            rows[name] = {"config": name, "ok": False, "wrapper": False, "pt2": False, "onnx": False, "parity": None,
                          "error": "segmentation model: out of scope", "wall_s": 0.0}
    log(f"sweep: {len(todo)} configs to run, {len(rows)} already recorded, {jobs} at a time")
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, name, timeout, memory_gib, threads) for name in todo]
        for i, future in enumerate(as_completed(futures), 1):
            row = future.result()
            name = row["config"]
            rows[name] = row
            log(f"[{i}/{len(todo)}] {'✓' if row['ok'] else '✗'} {name} ({row['wall_s']} s) {row['error'] or ''}")
            DOCS.mkdir(exist_ok=True)
            state.write_text(json.dumps({"results": sorted(rows.values(), key=lambda r: r["config"])}, indent=1) + "\n")
            write_report(list(rows.values()), kinds)
    path = write_report(list(rows.values()), kinds)
    log(f"wrote {path} and {state}")
    return 0
