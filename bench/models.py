"""Benchmark of every exported model on its real frame (run on request).

    .venv/bin/python bench/models.py [--models SUBSTRING ...] [--runs 5] [--cache bench/results]
                                     [--skip-iree SUBSTRING ...] [--merge] [--note TEXT]

For each committed head wrapper under generated/ (or those matching ``--models``): export it
once (``--format all``: PT2, ONNX and the vmfb of the tool's IREE preset, validated against eager;
plus a vmfb with IREE's own default flags; cached under ``--cache`` and reused while the wrapper
is unchanged), then time, each
in its own child process so that peak memory is per runtime:

- ``predict``: eager mmdet3d ``model.predict`` (mmcv CPU ops; with the recipe's patches for
  models whose original cannot run on a CPU, marked ``patched``), from preprocessed inputs;
- ``eager_head``: the wrapper's forward (the model's tensor path) in eager PyTorch;
- ``pt2``: the reloaded ExportedProgram; ``onnx``: onnxruntime; ``iree_*``: the IREE runtime.

Reports the median latency, its ratio to eager predict (measured in the same run), peak RSS of
the child (which includes Python + torch, ~0.4 GiB), and the fp32 compute floor (the wrapper's
FLOPs by torch.utils.flop_counter / a measured fp32 matmul GFLOP/s). Writes
docs/bench_models.md, docs/bench_models.json and docs/bench_models.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DOCS = REPO / "docs"

from bench.pointpillars import matmul_gflops, median_ms  # noqa: E402 (one timing helper for both benchmarks)

# IREE presets timed: the export's validated vmfb (model.vmfb, codegen.iree.DEFAULT_PRESET) and
# IREE's own defaults compiled beside it (model.default.vmfb)
IREE_EXTRA_PRESETS = ("default",)
# time budget of one runtime's timing loop: a runtime slower than BUDGET_S / (2 + runs) a call
# (IREE's O(n^2) sorts on dynamic-voxel models) is timed on fewer runs (bench.pointpillars.median_ms)
BUDGET_S = 120.0


# ------------------------------------------------------------------ child: one runtime, one model


def _child(export_dir: Path, runtime: str, runs: int) -> dict:
    import numpy as np
    import torch

    from codegen import sample as smp
    from codegen.export import import_wrapper
    from codegen.generate import predict_context
    from codegen.recipes import BY_NAME

    # every runtime uses the CPUs this process may run on (``taskset -c 0`` benches one core)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    meta = json.loads((export_dir / "metadata.json").read_text())
    module = import_wrapper(next(export_dir.glob("wrapper_*.py")))
    saved = np.load(export_dir / "inputs.npz")
    names = list(module.INPUT_NAMES)
    args = [torch.from_numpy(saved[n]) for n in names]
    fresh = lambda: [a.clone() for a in args]  # noqa: E731 (the original PillarFeatureNet writes into its input)
    result: dict = {}
    if runtime == "breakdown":  # one thread: IREE's statistics sum the workers' tile times
        return _breakdown(export_dir, names, saved, 1, runs)
    if runtime in ("predict", "eager_head", "flops"):
        wrapper = module.build().eval()
        recipe = BY_NAME[module.RECIPE]
        patched = recipe.reference == "patched"
        # predict runs the recipe's predict_patches (also Part-A2's, whose tensor path is the original's)
        result["patched"] = patched or (runtime == "predict" and recipe.predict_patches is not None)
        if runtime == "predict":
            model = wrapper.model
            s = smp.sample_frame(model, module.FRAME)

            def fn():
                with torch.no_grad(), predict_context(recipe, module.BATCH_SIZE):
                    model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])

        elif runtime == "eager_head":
            wrapper.patched = patched

            def fn():
                with torch.no_grad():
                    wrapper(*fresh())

        else:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                wrapper(*fresh())
            return {"flops": counter.get_total_flops(), "matmul_gflops": matmul_gflops()}
    elif runtime == "pt2":
        program = torch.export.load(str(export_dir / "model.pt2")).module()

        def fn():
            with torch.no_grad():
                program(*fresh())

    elif runtime == "onnx":
        from codegen.validate import ort_session

        session = ort_session(export_dir / "model.onnx", threads)
        feeds = {n: saved[n] for n in names}
        fn = lambda: session.run(None, feeds)  # noqa: E731
    elif runtime.startswith("iree_"):
        import iree.runtime

        from codegen.iree import DEFAULT_PRESET, iree_runtime

        iree.runtime.flags.parse_flags(f"--task_topology_group_count={threads}")

        preset = runtime[len("iree_") :]
        vmfb = export_dir / ("model.vmfb" if preset == DEFAULT_PRESET else f"model.{preset}.vmfb")
        run = iree_runtime(vmfb, names).run
        fn = lambda: run(tuple(args))  # noqa: E731
    else:
        raise SystemExit(f"unknown runtime {runtime}")
    # the host's speed drifts by 10-15 % over minutes: the floor this runtime is compared with
    # uses a matmul measured in this process just before and after its timing loop
    # (its three 16 MiB matrices can raise the peak RSS of the smallest models by that much)
    before = matmul_gflops()
    result["median_ms"] = median_ms(fn, runs, budget_s=BUDGET_S)
    result["peak_rss_gib"] = peak_rss_gib()
    result["matmul_gflops"] = (before + matmul_gflops()) / 2
    result["threads"] = threads
    result["model"] = meta["model_config"]
    return result


# per-part breakdown: IREE dispatch names and onnxruntime op types -> one of these parts
PARTS = ("conv", "matmul", "layout", "other")


def _part_of_dispatch(name: str) -> str:
    """``main_graph$async_dispatch_36_conv_62x54x256x3x3x256_f32`` -> ``conv`` (IREE names a
    dispatch after its root op); data-tiling packs (``_encoding_*``) and transposes -> ``layout``."""
    if "_conv_" in name:
        return "conv"
    if "_matmul_" in name or "_mmt4d_" in name or "_batch_matmul_" in name:
        return "matmul"
    if name.startswith("_encoding") or "_pack_" in name or "_unpack_" in name or "_transpose_" in name:
        return "layout"
    return "other"


def _part_of_op(op: str) -> str:
    if op in ("Conv", "FusedConv", "NchwcConv", "ConvTranspose"):
        return "conv"
    if op in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger"):
        return "matmul"
    if op in ("Transpose", "ReorderInput", "ReorderOutput"):
        return "layout"
    return "other"


def peak_rss_gib() -> float:
    """This process's own peak RSS: the kernel's high-water mark of its address space (VmHWM).
    Not ``ru_maxrss``, which Linux carries over an exec from the parent at fork (a child of a
    bench parent that had loaded an 85 MB ONNX graph reported the parent's 1.56 GiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _breakdown(export_dir: Path, names: list[str], saved, threads: int, runs: int) -> dict:
    """Time per part (ms per call, summed kernel / dispatch time): onnxruntime's profiler by op
    type, and the IREE vmfb's ``--print_device_statistics`` by dispatch."""
    import re
    import tempfile

    import numpy as np

    from codegen.iree import _tool
    from codegen.memory import RETAIN_MEMORY_ENV
    from codegen.validate import ort_session

    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp:
        session = ort_session(export_dir / "model.onnx", threads, profile_prefix=str(Path(tmp) / "ort"))
        feeds = {n: saved[n] for n in names}
        session.run(None, feeds)  # warm-up, left out below
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        runs_seen = [e for e in events if e.get("name") == "model_run"]
        first = sorted(e["ts"] for e in runs_seen)[1] if len(runs_seen) > 1 else 0
        parts = dict.fromkeys(PARTS, 0.0)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
                parts[_part_of_op(e["args"]["op_name"])] += e["dur"] / 1000 / runs
        result["onnx"] = {k: round(v, 1) for k, v in parts.items()}
        timed = sorted(e["dur"] / 1000 for e in runs_seen if e["ts"] >= first)
        if timed:  # the whole call, one thread: what the parts leave out shows against it
            result["onnx_call_ms"] = round(timed[len(timed) // 2], 1)
        vmfb = export_dir / "model.vmfb"
        if vmfb.is_file():
            flags = []
            for n in names:
                np.save(Path(tmp) / f"{n}.npy", saved[n])
                flags.append(f"--input=@{Path(tmp) / f'{n}.npy'}")
            proc = subprocess.run(
                [_tool("iree-benchmark-module"), f"--module={vmfb}", "--device=local-task", "--function=main_graph",
                 *flags, f"--task_topology_group_count={threads}", f"--benchmark_repetitions={runs}",
                 "--benchmark_min_time=1x", "--print_device_statistics"],
                capture_output=True, text=True, env={**os.environ, **RETAIN_MEMORY_ENV},  # as iree_runtime does
            )
            text = proc.stdout + proc.stderr
            # calls: the benchmark's iterations (its non-aggregate rows). Not the queue's "execute"
            # submissions: a graph with data-dependent sizes submits several per call (PointPillars-DV:
            # 4, split where the host reads a size back), which made earlier breakdowns 2-4x too small
            calls = sum(int(c) for c in re.findall(r"^BM_\S+/real_time\s+\S+ \w+\s+\S+ \w+\s+(\d+)", text, re.M))
            parts = dict.fromkeys(PARTS, 0.0)
            for m in re.finditer(r"^\s*host_execute (\S+)\s+count=\d+ total=([0-9.]+) (ms|us|ns)", text, re.M):
                parts[_part_of_dispatch(m.group(1))] += float(m.group(2)) * {"ms": 1, "us": 1e-3, "ns": 1e-6}[m.group(3)]
            if calls:
                result["iree_host"] = {k: round(v / calls, 1) for k, v in parts.items()}
                # per-iteration wall time: on graphs with tens of thousands of dispatches (the unrolled
                # point models) the statistics name only part of them (VoteNet: 28 of ~1080 ms, while
                # perf puts 90 % of the call in dispatch code)
                walls = sorted(float(w) for w in re.findall(r"^BM_\S+/real_time\s+([0-9.]+) ms", text, re.M))
                if walls:
                    result["iree_host_call_ms"] = round(walls[len(walls) // 2], 1)
    return result


# ------------------------------------------------------------------ parent


def _spawn(args: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -9, "", f"timed out after {timeout:.0f} s")


def _export(wrapper: Path, cache: Path, with_iree: bool = True) -> tuple[Path, dict]:
    """Export (PT2 + ONNX + the validated IREE vmfb) once per wrapper text, IREE presets and
    exporter source (every file of ``codegen/``: op library, patches, graph forms); compile the
    extra presets."""
    from codegen import iree
    from codegen.metadata import IREE_ONNX

    presets = {name: iree.preset_flags(name) for name in iree.PRESETS}  # as this host resolves them
    key = wrapper.read_bytes() + json.dumps([presets, with_iree], sort_keys=True).encode()
    key += b"".join(p.read_bytes() for p in sorted((REPO / "codegen").rglob("*.py")))
    digest = hashlib.sha256(key).hexdigest()[:16]
    out = cache / wrapper.stem.removeprefix("wrapper_")
    stamp = out / "bench.stamp"
    if stamp.is_file() and stamp.read_text() == digest:
        return out, json.loads(stamp.with_suffix(".json").read_text())
    info: dict = {}
    for stale in out.glob("*.vmfb"):  # a re-export without IREE must not time the last one's vmfb
        stale.unlink()
    # without IREE when it does not compile: the other runtimes still count
    for fmt in ("all", "both") if with_iree else ("both",):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "codegen",
                "export",
                str(wrapper),
                "--output-dir",
                str(out),
                "--format",
                fmt,
                "--device",
                "cpu",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        info.update(
            export_s=round(time.perf_counter() - start, 1),
            export_peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
            export_ok=os.waitstatus_to_exitcode(status) == 0,
        )
        error = next((line for line in log.splitlines() if line.startswith("error:")), log.strip()[-300:])
        if info["export_ok"]:
            break
        info["iree_error" if fmt == "all" else "error"] = error
    if not with_iree:
        info["iree_error"] = "not compiled (--skip-iree)"
    if not info["export_ok"]:
        return out, info
    for preset in IREE_EXTRA_PRESETS if "iree_error" not in info else ():
        try:
            compiled = iree.compile_onnx(out / IREE_ONNX, out / f"model.{preset}.vmfb", preset)
            info[f"iree_{preset}_compile_s"] = compiled.compile_s
        except Exception as exc:  # recorded, the other runtimes still run
            info[f"iree_{preset}_error"] = str(exc)[:200]
    stamp.with_suffix(".json").write_text(json.dumps(info))
    stamp.write_text(digest)
    return out, info


def bench_model(wrapper: Path, cache: Path, runs: int, log=print, with_iree: bool = True) -> dict:
    from codegen.iree import DEFAULT_PRESET, host_isa

    out, row = _export(wrapper, cache, with_iree)
    row["wrapper"] = wrapper.name
    row["cpu_isa"] = host_isa()  # the host preset's convolutions depend on it (codegen.iree.preset_flags)
    if not row["export_ok"]:
        log(f"  export failed: {row['error']}")
        return row
    meta = json.loads((out / "metadata.json").read_text())
    row["model_config"] = meta["model_config"]
    row["parity"] = meta["validation"]["max_abs_diff"]
    runtimes = ["predict", "eager_head", "pt2", "onnx"]
    runtimes += [f"iree_{DEFAULT_PRESET}"] if (out / "model.vmfb").is_file() else []
    runtimes += [f"iree_{p}" for p in IREE_EXTRA_PRESETS if (out / f"model.{p}.vmfb").is_file()]
    row["latency_ms"], row["peak_rss_gib"] = {}, {}
    for runtime in ["flops", *runtimes]:
        proc = _spawn([sys.executable, __file__, "--child", str(out), runtime, "--runs", str(runs)])
        if proc.returncode != 0:
            row.setdefault("errors", {})[runtime] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            log(f"  {runtime}: failed: {row['errors'][runtime]}")
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if runtime == "flops":
            flops = got["flops"]
            row["gflop"] = round(flops / 1e9, 2)
            row["matmul_gflops"] = round(got["matmul_gflops"], 1)
            row["fp32_floor_ms"] = round(got["flops"] / (got["matmul_gflops"] * 1e9) * 1e3, 1)
            continue
        row["latency_ms"][runtime] = round(got["median_ms"], 1)
        row.setdefault("matmul_gflops_by_runtime", {})[runtime] = round(got["matmul_gflops"], 1)
        row["peak_rss_gib"][runtime] = round(got["peak_rss_gib"], 2)
        if runtime == "predict":  # the * of the predict cell
            row["reference_patched"] = got["patched"]
        log(f"  {runtime:<14} {got['median_ms']:9.1f} ms  {got['peak_rss_gib']:.2f} GiB")
    proc = _spawn([sys.executable, __file__, "--child", str(out), "breakdown", "--runs", str(runs)])
    if proc.returncode == 0:
        row["breakdown_ms"] = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        row.setdefault("errors", {})["breakdown"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    base = row["latency_ms"].get("predict")
    if base:
        row["ratio_to_predict"] = {k: round(v / base, 2) for k, v in row["latency_ms"].items()}
    if row.get("fp32_floor_ms"):  # each runtime against the floor at its own measured matmul speed
        gflops = row["matmul_gflops_by_runtime"]
        row["ratio_to_floor"] = {k: round(v / (flops / (gflops[k] * 1e9) * 1e3), 2) for k, v in row["latency_ms"].items()}
    return row


def _model_name(row: dict) -> str:
    """``wrapper_<model>.py`` -> ``<model>``."""
    return row["wrapper"].removeprefix("wrapper_").removesuffix(".py")


def write_report(rows: list[dict], runs: int, notes: list[str] = ()) -> None:
    import torch

    DOCS.mkdir(exist_ok=True)
    machine = {"cpus": len(os.sched_getaffinity(0)), "cpu_ids": sorted(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__}
    (DOCS / "bench_models.json").write_text(
        json.dumps({"machine": machine, "runs": runs, "notes": list(notes), "models": rows}, indent=2) + "\n"
    )
    runtimes = sorted({k for r in rows for k in r.get("latency_ms", {})}, key=_runtime_order)
    lines = [
        "# Exported models: latency and memory per runtime",
        "",
        f"Generated by `bench/models.py` on {machine['cpus']} CPU cores, torch {machine['torch']}; median of {runs} runs "
        "on each model's real frame (the export's inputs.npz), each runtime in its own process. Cells: median ms "
        "(ratio to eager `predict` measured in the same run; ratio to the fp32 compute floor: the FLOPs of the "
        "wrapper as it runs, the tool's patches included (torch's FlopCounterMode), at "
        "the speed of a 2048² fp32 torch matmul measured in the runtime's own process just before and after its "
        "timing loop, since the host's speed drifts by 10-15 % over minutes; the floor column uses the matmul "
        "of the FLOP-counting process). `predict` is "
        "mmdet3d's eager predict with mmcv CPU ops (*patched*: with the tool's op replacements, the original cannot run "
        "on a CPU). Peak RSS is the child process's, Python + torch included. Every runtime uses as many threads "
        "as the process has CPUs. CPU: the widest vector ISA of the host the row was timed on (avx512 or avx2; "
        "the IREE `host` preset's convolutions depend on it, and rows from different hosts are not comparable).",
        "",
        *[line for note in notes for line in (note, "")],
        "| model | CPU | GFLOP | floor ms | " + " | ".join(runtimes) + " | export s / GiB |",
        "|---|---|---:|---:|" + "---:|" * len(runtimes) + "---:|",
    ]
    for r in rows:
        name = _model_name(r)
        if not r.get("export_ok"):
            lines.append(
                f"| {name} | | | | " + " | ".join("" for _ in runtimes) + f" | failed: {r.get('error', '')[:80]} |"
            )
            continue
        cells = []
        for k in runtimes:
            v = r["latency_ms"].get(k)
            if v is None:
                cells.append("✗" if k in r.get("errors", {}) else "")
                continue
            ratios = [f"{r['ratio_to_predict'][k]}×" if "ratio_to_predict" in r else "?"]
            if "ratio_to_floor" in r:
                ratios.append(f"{r['ratio_to_floor'][k]}× floor")
            mark = "*" if k == "predict" and r.get("reference_patched") else ""
            cells.append(f"{v}{mark} ({'; '.join(ratios)})")
        lines.append(
            f"| {name} | {r.get('cpu_isa', '')} | {r.get('gflop', '')} | {r.get('fp32_floor_ms', '')} | "
            + " | ".join(cells)
            + f" | {r['export_s']} / {r['export_peak_rss_gib']} |"
        )
    from codegen.iree import DEFAULT_PRESET

    tuned = f"iree_{DEFAULT_PRESET}"
    lines += [
        "",
        f"Goals (issue 6): onnxruntime ≤ 1.15× the fp32 floor; IREE tuned (`{tuned}`) ≤ 1.2× onnxruntime.",
        "",
        f"| model | onnx ÷ floor | matmul GFLOP/s (onnx process) | {tuned} ÷ onnx |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lat, to_floor = r.get("latency_ms", {}), r.get("ratio_to_floor", {})
        if "onnx" not in lat:
            continue
        name = _model_name(r)
        a = f"{to_floor['onnx']:.2f}× {'✓' if to_floor['onnx'] <= 1.15 else '✗'}" if "onnx" in to_floor else ""
        speed = r.get("matmul_gflops_by_runtime", {}).get("onnx", "")
        b = f"{lat[tuned] / lat['onnx']:.2f}× {'✓' if lat[tuned] / lat['onnx'] <= 1.2 else '✗'}" if tuned in lat else ""
        b = b or ("not timed (--skip-iree)" if _skipped_iree(r) else "not compiled")
        lines.append(f"| {name} | {a} | {speed} | {b} |")
    lines += [
        "",
        "Per-part breakdown on **one thread** (ms per call: onnxruntime's profiler by op type, IREE's "
        "`--print_device_statistics` by dispatch, which sums the workers' tile times, hence one thread; kernel "
        "time only, so the sums are below one-thread latencies). conv: convolutions; matmul: "
        "MatMul / Gemm (deconvolutions as MatMul in IREE and, before the fortieth session, in onnxruntime, "
        "PFN / VFE linears, 1x1 heads after the graph forms); layout: "
        "transposes, onnxruntime's NCHWc reorders, IREE's data-tiling packs; other: the rest (scatter, "
        "elementwise, reductions). call: one whole call on one thread in the same process (rows since the "
        "nineteenth session), against which the sum shows what the parts leave out.",
        "",
        "| model | runtime | " + " | ".join(PARTS) + " | sum | call |",
        "|---|---|" + "---:|" * (len(PARTS) + 2),
    ]
    for r in rows:
        breakdown = r.get("breakdown_ms", {})
        for runtime, parts in breakdown.items():
            if not isinstance(parts, dict):  # a runtime's one-thread call time (the last column)
                continue
            name = _model_name(r)
            cells = [f"{parts.get(k, 0):.1f}" for k in PARTS]
            call = breakdown.get(f"{runtime}_call_ms", "")
            lines.append(f"| {name} | {runtime} | " + " | ".join(cells) + f" | {sum(parts.values()):.1f} | {call} |")
    lines += [
        "",
        "Peak RSS (GiB) per runtime:",
        "",
        "| model | " + " | ".join(runtimes) + " |",
        "|---|" + "---:|" * len(runtimes),
    ]
    for r in rows:
        if r.get("export_ok"):
            name = _model_name(r)
            lines.append(f"| {name} | " + " | ".join(str(r["peak_rss_gib"].get(k, "")) for k in runtimes) + " |")
    errors = [(r["wrapper"], k, e) for r in rows for k, e in r.get("errors", {}).items()]
    errors += [
        (r["wrapper"], k, r[k])
        for r in rows
        for k in sorted(r)
        if k.startswith("iree_") and k.endswith("error") and not (k == "iree_error" and _skipped_iree(r))
    ]
    if errors:
        lines += ["", "Failures:", ""] + [f"- {w} {k}: {e}" for w, k, e in errors]
    skipped = [_model_name(r) for r in rows if _skipped_iree(r)]
    if skipped:
        lines += [
            "",
            "Exported without IREE (`--skip-iree`: compiled and validated outside this benchmark, results in "
            "docs/iree.md): " + ", ".join(skipped) + ".",
        ]
    lines += ["", "![latency chart](bench_models.png)", ""]
    (DOCS / "bench_models.md").write_text("\n".join(lines))
    _chart(rows, runtimes)
    print("\n".join(lines))


def _skipped_iree(row: dict) -> bool:
    return row.get("iree_error", "").endswith("(--skip-iree)")


def _runtime_order(name: str) -> tuple[int, str]:
    order = ["predict", "eager_head", "pt2", "onnx"]
    return (order.index(name) if name in order else len(order), name)


def _chart(rows: list[dict], runtimes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r.get("ratio_to_predict")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5), dpi=110)
    width = 0.8 / len(runtimes)
    x = np.arange(len(rows))
    for i, k in enumerate(runtimes):
        values = [r["ratio_to_predict"].get(k, np.nan) for r in rows]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=k)
    ax.axhline(1.0, color="k", linewidth=0.6)
    ax.set_xticks(
        x,
        [_model_name(r)[:28] for r in rows],
        rotation=25,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("latency / eager predict (lower is faster)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "bench_models.png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=[], help="only wrappers whose name contains one of these")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "results", help="export cache (reused)")
    parser.add_argument("--note", default="", help="a sentence on the conditions, written into the report")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other models' rows (and notes) of docs/bench_models.json"
    )
    parser.add_argument(
        "--skip-iree", nargs="*", default=[], help="wrappers (substrings) exported without IREE (models whose iree-compile takes long or fails: docs/iree.md)"
    )
    parser.add_argument("--child", nargs=2, metavar=("EXPORT_DIR", "RUNTIME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from codegen.memory import one_malloc_arena

        one_malloc_arena()  # as the CLI does (codegen.memory), before any runtime starts threads
        print(json.dumps(_child(Path(args.child[0]), args.child[1], args.runs)))
        return 0
    wrappers = [
        p
        for p in sorted((REPO / "generated").glob("wrapper_*.py"))
        if not p.stem.endswith("_boxes") and (not args.models or any(m in p.name for m in args.models))
    ]
    rows = []
    for wrapper in wrappers:
        print(f"{wrapper.name}", flush=True)
        with_iree = not any(m in wrapper.name for m in args.skip_iree)
        rows.append(bench_model(wrapper, args.cache, args.runs, with_iree=with_iree))
    notes = [args.note] if args.note else []
    if args.merge and (DOCS / "bench_models.json").is_file():
        old = json.loads((DOCS / "bench_models.json").read_text())
        fresh = {r["wrapper"] for r in rows}
        rows = sorted([r for r in old["models"] if r["wrapper"] not in fresh] + rows, key=lambda r: r["wrapper"])
        notes = old.get("notes", []) + notes
    write_report(rows, args.runs, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
