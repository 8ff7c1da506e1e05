"""Benchmark of the shipped default: PointPillars on the KITTI frame (run on request).

    .venv/bin/python bench/pointpillars.py [--runs 10] [--install]

Measures the one-shot export (wall time, peak RSS of the process), the latency of the eager
head vs the reloaded PT2 vs onnxruntime on the same inputs, the compute floor (head FLOPs from
torch.utils.flop_counter / a measured fp32 matmul GFLOP/s) and the parity figures; with
``--install`` also a fresh install into a temporary venv. Writes docs/bench_pointpillars.md
and docs/bench_pointpillars.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car"


def median_ms(fn, runs: int, warmup: int = 2, budget_s: float | None = None) -> float:
    """Median wall time of ``runs`` calls after ``warmup`` calls.  With ``budget_s``, a slow ``fn``
    (first call longer than ``budget_s / (warmup + runs)``) gets one warm-up and as many runs as
    fit in the budget (at least one)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if budget_s is not None and first * (warmup + runs) > budget_s:
        warmup, runs = 1, max(1, min(runs, int(budget_s / first) - 1))
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, runs: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = median_ms(lambda: a @ b, runs)
    return 2 * n**3 / (ms / 1e3) / 1e9


def fresh_install_seconds() -> float:
    with tempfile.TemporaryDirectory(prefix="bench-venv-") as tmp:
        env = dict(os.environ, MMDET3D_EXPORT_VENV=str(Path(tmp) / "venv"))
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "scripts" / "install.py")], check=True, env=env)
        return time.perf_counter() - start


def one_shot(out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of the one-shot CLI in a child process."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "codegen", "--config", CONFIG, "--output-dir", str(out)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 2**20


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--install", action="store_true", help="also time a fresh install")
    args = parser.parse_args()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
    }
    if args.install:
        results["fresh_install_s"] = round(fresh_install_seconds(), 1)

    with tempfile.TemporaryDirectory(prefix="bench-pp-") as tmp:
        out = Path(tmp) / "pp"
        wall, rss = one_shot(out)
        results["one_shot_export_s"] = round(wall, 1)
        results["one_shot_peak_rss_gib"] = round(rss, 2)
        meta = json.loads((out / "metadata.json").read_text())
        results["parity_max_abs_diff"] = meta["validation"]["max_abs_diff"]
        results["step_timings_s"] = meta["timings_s"]

        sys.path.insert(0, str(REPO))
        from codegen.export import import_wrapper

        module = import_wrapper(next(out.glob("wrapper_*.py")))
        wrapper = module.build().eval()
        saved = np.load(out / "inputs.npz")
        inputs = tuple(torch.from_numpy(saved[n]) for n in module.INPUT_NAMES)
        results["num_voxels"] = int(inputs[0].shape[0])

        from codegen.validate import ort_session

        pt2 = torch.export.load(str(out / "model.pt2")).module()
        session = ort_session(out / "model.onnx")
        feeds = {n: saved[n] for n in module.INPUT_NAMES}

        def eager():
            wrapper.patched = False
            with torch.no_grad():
                wrapper(*[a.clone() for a in inputs])

        def exported():
            with torch.no_grad():
                pt2(*[a.clone() for a in inputs])

        latency = {
            "eager_head": median_ms(eager, args.runs),
            "pt2_reloaded": median_ms(exported, args.runs),
            "onnxruntime": median_ms(lambda: session.run(None, feeds), args.runs),
        }
        from torch.utils.flop_counter import FlopCounterMode

        wrapper.patched = True
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            wrapper(*[a.clone() for a in inputs])
        flops = counter.get_total_flops()
    gflops = matmul_gflops()
    floor_ms = flops / (gflops * 1e9) * 1e3
    results.update(
        head_gflop=round(flops / 1e9, 1),
        matmul_gflops=round(gflops, 1),
        fp32_floor_ms=round(floor_ms, 1),
        latency_ms={k: round(v, 1) for k, v in latency.items()},
        ratio_to_floor={k: round(v / floor_ms, 2) for k, v in latency.items()},
    )
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "bench_pointpillars.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# PointPillars benchmark (KITTI frame 000008)",
        "",
        f"Generated by `bench/pointpillars.py` on {results['machine']['cpus']} CPU cores, torch {torch.__version__}, "
        f"{results['num_voxels']} pillars.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    if "fresh_install_s" in results:
        lines.append(f"| fresh install (scripts/install.py) | {results['fresh_install_s']} s |")
    lines += [
        f"| one-shot export wall time (goal ≤ 60 s) | {results['one_shot_export_s']} s |",
        f"| one-shot peak RSS (goal ≤ 4 GiB) | {results['one_shot_peak_rss_gib']} GiB |",
        f"| head FLOPs | {results['head_gflop']} GFLOP |",
        f"| fp32 matmul throughput | {results['matmul_gflops']} GFLOP/s |",
        f"| fp32 compute floor | {results['fp32_floor_ms']} ms |",
    ]
    for k, v in results["latency_ms"].items():
        lines.append(f"| latency {k} (median of {args.runs}) | {v} ms ({results['ratio_to_floor'][k]}× floor) |")
    for k, v in results["parity_max_abs_diff"].items():
        lines.append(f"| parity max abs diff, {k} | {v:.3g} |")
    (docs / "bench_pointpillars.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
