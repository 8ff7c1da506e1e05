"""IREE target: compile the exported ONNX for llvm-cpu into ``model.vmfb`` and run it.

The vmfb is compiled from ``model.iree.onnx`` (``IREE_ONNX``): the wrapper exported again in
IREE's op forms (``codegen.ops.points.export_forms``: sequential loops unrolled, radix sorts, no
data-dependent sizes), while ``model.onnx`` keeps the forms onnxruntime runs fastest (and its own
graph forms, ``graph_forms.onnxruntime_forms``; where both exports are the same program,
``model.iree.onnx`` is ``model.onnx`` before those):

1. ``iree_onnx``: a copy of the ONNX graph with the constructs IREE's importer rejects rewritten
   (``codegen.graph_forms``; numerically the same model), optionally with the dynamic axis
   pinned (``static``);
2. ``iree-import-onnx`` (``iree.compiler.tools.import_onnx``) to MLIR;
3. ``iree-compile`` with a flags preset (``PRESETS``) for llvm-cpu.

The runtime (``iree_runtime``) loads the vmfb with iree-base-runtime's ``local-task`` driver and
is validated against the eager model like every other format. docs/iree.md has the
measurements behind the graph forms and the presets.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import ExportError
from .memory import retain_freed_memory
from .metadata import IREE_ONNX
from .graph_forms import (
    ONLINE_ATTENTION,
    cancel_transpose_pairs,
    channels_last_concats,
    chunked_long_matmuls,
    cpu_forms,
    drop_empty_concat_inputs,
    gathered_row_matmuls,
    grouped_deconvs_as_convs,
    list_constants_as_initializers,
    pointwise_convs_as_matmuls,
    row_max_pools_as_reductions,
    row_max_scatters_as_scatter_nd,
    shifted_output_convs,
    split_long_reductions,
    strided_convs_as_space_to_depth,
    strided_pointwise_convs_as_slices,
    winograd_convs,
)

if TYPE_CHECKING:
    from .validate import Runtime

# iree-compile flags shared by every preset: the local llvm-cpu HAL target, ONNX input, and 64 KB
# of stack per dispatch instead of 32 KB (the limit iree-compile checks each dispatch against; far
# below a worker thread's stack):
# Group-Free 3D's decoder has a 16 x 288 reduction dispatch that keeps two 18 KB tiles on the
# stack ("exceeded stack allocation limit of 32768 bytes ... Got 36864 bytes")
BASE_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-input-type=onnx",
    "--iree-llvmcpu-stack-allocation-limit=65536",
)

# IREE's data tiling (packed operands, the mmt4d ukernels). With it, every stride-1 3x3
# convolution (16 channels or more) is written as Winograd F(4x4, 3x3) (graph_forms.winograd_convs):
# its 2.25 products per output pixel and channel pair run as 36 matmuls. On an AVX-512 Xeon,
# two threads, against the data-tiled direct convolutions: PointPillars 267-289 -> 218-236 ms,
# SECOND 787-820 -> 638-663 ms, SMOKE 817-869 -> 815-831 ms (twenty-ninth session); on AVX2 hosts,
# with im2col, docs/iree.md (twenty-sixth session).
DATA_TILING = "--iree-opt-data-tiling"

CHANNELS_LAST = "--iree-preprocessing-pass-pipeline=builtin.module(util.func(iree-preprocessing-convert-conv-to-channels-last))"

# the op families data tiling applies to: IREE's default (matmuls) plus convolutions, whose
# data-tiled (NCHWc-like) form runs the 256-channel 3x3 convs 2.7x faster than the direct NHWC
# one on a Xeon core (whole models 1.0-2.2x)
MATMUL_DATA_TILING = "--iree-dispatch-creation-experimental-set-data-tiling-ops=matmul"
CONV_DATA_TILING = "--iree-dispatch-creation-experimental-set-data-tiling-ops=convolution"
DATA_TILED_OPS = (MATMUL_DATA_TILING, CONV_DATA_TILING)

# Without AVX-512 both direct convolution paths are slow (PointPillars on a Zen 3 host, two
# threads: data-tiled 7.6 s, plain NHWC 9.1 s): convolutions go through im2col and the data-tiled
# matmul ukernels instead (0.60-0.64 s; onnxruntime 0.36 s). ``preset_flags`` makes this choice
# for ``host``; ``portable`` always makes it.
IM2COL_CONVS = "--iree-global-opt-use-im2col-for-convs"

# Matmuls over gathered rows (sparse convolutions: a dynamic row count, K = offsets x channels;
# deformable convolutions: bilinear sums of gathered rows, K = taps x channels) are not
# data-tiled: packing each gathered operand into tiles costs a full pass over it, more than the
# tiled kernel saves (one thread: SECOND 2751 -> 2419 ms, BEVFusion lidar 6862 -> 5710 ms;
# PointPillars, whose dynamic-row matmuls are narrow, 687 -> 711 ms, so it keeps them). Fused
# into the DCN sampling, the pack stores each sample element by element (PGD 12.7 -> 11.6 s,
# SMOKE 1948 -> 1890 ms without it, one thread; graph_forms.gathered_row_matmuls).
# (Measured on AVX-512 hosts. Without AVX-512 the convolutions go through im2col as matmuls,
# which need matmul data tiling (PointPillars 820 -> 630 ms without / with), and data tiling
# selects op kinds, not dispatches: there every matmul keeps it, gathered rows included.)
GATHERED_ROWS_MIN_K = 256


def _matmuls_data_tiled(gathered: tuple[int, int], im2col: bool) -> bool:
    """Whether flags that data-tile matmuls keep doing so for a graph with ``gathered`` =
    ``graph_forms.gathered_row_matmuls(.., GATHERED_ROWS_MIN_K)``: not with gathered-row products,
    unless convolutions go through im2col (see ``GATHERED_ROWS_MIN_K``)."""
    return im2col or not any(gathered)


# The sparse convolutions' products (not data-tiled, above) vectorise their dynamic row count with
# masks by default: every FMA of an 8 x 16 tile masked and merged, ~55-60 GFLOP/s on a Zen 4 core.
# Peeled, full 8 x 32 tiles run unmasked and a remainder loop takes the rest: 90-106 GFLOP/s
# (onnxruntime's MLAS 71-92) on [15000, 1728] x [1728, 64] and the other sparse-conv shapes. The
# flag is global, and static contractions that are not data-tiled run up to 2.5x slower peeled
# (PGD's 1x1 convolutions: 11.2 -> 14.7 s a frame; BEVFusion's Swin: 11.0 -> 13.4 s). So graphs
# with dynamic-row products (graph_forms.gathered_row_matmuls' first count) are configured twice,
# with and without it, and only dispatches whose matmul has a dynamic row count take the peeled
# configuration (``_peel_dynamic_row_matmuls``): CenterPoint voxel 2586 -> 2187 ms one thread.
VECTOR_PEELING = "--iree-llvmcpu-vector-pproc-strategy=peel"

# IREE 3.13 configures a static f32 matmul that is not data-tiled (graphs with gathered-row
# products, GATHERED_ROWS_MIN_K) on AVX-512 with 8 x 16 vector tiles (8 of the 32 zmm registers
# accumulate), K steps of 16 and 64-column workgroup tiles: 80-105 GFLOP/s on one Xeon core, where
# onnxruntime's MLAS runs the same products at ~135. With 32-column vector tiles (8 x 32 where IREE
# took 8 rows), K steps of 8 and workgroup tiles of the widest of 256, 128, 64 columns that divides
# N (``_widen_matmul_tiles``; one thread, micro: [5800, 256] x [256, 1024] 38.1 -> 26.9 ms, [5800,
# 1024] x [1024, 256] 25.2 -> 20.5 ms) PGD's DCN products ([5800, 1152] x [1152, 256] chunks) took
# 34.5 -> 22.3 ms and its 256 -> 1024 convolutions 35.8 -> 24.8 ms; the same outputs to the bit
# (the same K order per output). Only products that read B as [K, N]: with B as [N, K] (a 1x1
# Conv's own weight layout, ``matmul_like`` dispatches) the wider tiles lost (33.8 -> 43.5 ms).
# Whole models, interleaved on the same host: PGD 9837 -> 8205 ms one thread, 5107 -> 4339 ms two;
# SECOND 1346 -> 1231 ms, 681 -> 626 ms (docs/iree.md, thirty-ninth session).
WIDE_MATMUL_TILES = {"vector_columns": 32, "k_step": 8, "workgroup_columns": (256, 128, 64)}

# preset -> extra iree-compile flags. Every preset is validated against eager on each export.
PRESETS: dict[str, tuple[str, ...]] = {
    # IREE's defaults for a generic x86-64 CPU: runs on any x86-64 machine, slow
    "default": ("--iree-llvmcpu-target-cpu=generic",),
    # the host CPU's ISA (AVX-512 where present), NHWC convolutions, data tiling (matmuls and,
    # since 2026-12-02, convolutions: PointPillars 1117 -> 866 ms, PointPillars nuScenes
    # 3269 -> 1481 ms on one Xeon core; docs/iree.md) + ukernels, stride-1 3x3 convolutions as
    # Winograd (``DATA_TILING``). On a CPU without AVX-512, the other convolutions through im2col
    # instead (``preset_flags``)
    "host": (
        "--iree-llvmcpu-target-cpu=host",
        DATA_TILING,
        "--iree-llvmcpu-enable-ukernels=all",
        CHANNELS_LAST,
        *DATA_TILED_OPS,
        VECTOR_PEELING,
    ),
    # any x86-64 CPU with AVX2 + FMA (x86-64-v3: Haswell, Zen 1 and later), so convolutions
    # through im2col (IM2COL_CONVS; PointPillars 12 s -> 1.6 s on one core)
    "portable": (
        "--iree-llvmcpu-target-cpu=x86-64-v3",
        DATA_TILING,
        "--iree-llvmcpu-enable-ukernels=all",
        CHANNELS_LAST,
        IM2COL_CONVS,
    ),
}
DEFAULT_PRESET = "host"


@functools.cache
def host_isa() -> str:
    """The widest x86 vector ISA of this CPU as IREE's runtime sees it (``iree-cpuinfo``, shipped
    with iree-base-runtime): ``avx512`` (AVX-512F), ``avx2``, or ``other``."""
    try:
        out = subprocess.run([_tool("iree-cpuinfo")], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "other"
    features = {name for name, value in re.findall(r"^(\S+)\s+(\d+)$", out, re.M) if value == "1"}
    return "avx512" if "avx512f" in features else "avx2" if "avx2" in features else "other"


def preset_flags(preset: str, isa: str | None = None) -> tuple[str, ...]:
    """``PRESETS[preset]`` for a CPU with ``isa`` (default: this host's): ``host`` keeps its
    data-tiled direct convolutions on AVX-512 only, and otherwise takes ``IM2COL_CONVS``."""
    if preset not in PRESETS:
        raise ExportError(f"unknown IREE preset {preset!r} (choose from {', '.join(PRESETS)})")
    flags = PRESETS[preset]
    if preset == "host" and (isa or host_isa()) != "avx512":
        flags = (*(f for f in flags if f != CONV_DATA_TILING), IM2COL_CONVS)
    return flags


@dataclass
class Compiled:
    """What one IREE compilation did (recorded in metadata.json)."""

    preset: str
    flags: list[str]
    static: dict[str, dict] = field(default_factory=dict)  # pinned dims: {dim: {size, inputs}}
    padding: str | None = None  # PADDINGS key when static
    rewrites: list[str] = field(default_factory=list)  # graph forms applied
    function: str = "main_graph"
    import_s: float = 0.0
    compile_s: float = 0.0
    onnx_forms: list[str] | None = None  # CPU graph forms of the ONNX it was compiled from
    host_isa: str = ""  # the compiling CPU's ISA (``host_isa``): ``host``'s flags depend on it

    def to_json(self) -> dict:
        return {
            "preset": self.preset,
            "flags": self.flags,
            "host_isa": self.host_isa,
            "static": self.static or None,
            "padding": self.padding,
            "padding_rule": PADDINGS.get(self.padding) if self.static else None,
            "function": self.function,
            # the ONNX export it was compiled from (IREE's op forms), and that file's CPU forms
            "onnx": IREE_ONNX,
            **({"onnx_graph_forms": self.onnx_forms} if self.onnx_forms is not None else {}),
            "graph_rewrites": self.rewrites,
            "import_s": self.import_s,
            "compile_s": self.compile_s,
        }


@dataclass
class IreeForm:
    """What ``iree_onnx`` wrote: the rewrites applied, the graph's name (the vmfb's function) and
    ``graph_forms.gathered_row_matmuls(.., GATHERED_ROWS_MIN_K)`` of the graph the untiled-matmul
    forms were chosen on (``compile_onnx`` sets the matmul flags on the same count)."""

    rewrites: list[str]
    function: str
    gathered: tuple[int, int]


def iree_onnx(
    onnx_path: Path,
    out_path: Path,
    static: dict[str, int] | None = None,
    im2col: bool = False,
    winograd: bool = False,
    conv_tiling: bool = False,
) -> IreeForm:
    """Write the IREE form of ``onnx_path`` to ``out_path`` (see ``IreeForm``). ``winograd``: the flags data-tile (``DATA_TILING``),
    so stride-1 3x3 convolutions are written as ``winograd_convs`` (their products are
    matmuls). ``im2col``: the flags send convolutions through im2col (``IM2COL_CONVS``), so the
    other stride-1 ones are written as ``shifted_output_convs``. ``conv_tiling``: the flags
    data-tile convolutions (``CONV_DATA_TILING``), so strided ones over few channels are written as
    ``strided_convs_as_space_to_depth``."""
    import onnx

    model = onnx.load(str(onnx_path))
    if static:
        for value in model.graph.input:
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param in static:
                    d.dim_value = static[d.dim_param]
    cleanup = drop_empty_concat_inputs(model)
    cleanup += list_constants_as_initializers(model)
    # the exported ONNX has the CPU forms already; pinned shapes (static) can make more nodes eligible.
    # cpu_forms infers the shapes (the clean-ups need none)
    rewrites = cpu_forms(model) + cleanup
    rewrites += row_max_scatters_as_scatter_nd(model)  # needs the shapes cpu_forms inferred
    rewrites += strided_pointwise_convs_as_slices(model)
    rewrites += grouped_deconvs_as_convs(model)
    if conv_tiling:
        rewrites += strided_convs_as_space_to_depth(model)
    # flags that data-tile (``winograd``) but not this graph's matmuls (as compile_onnx decides)
    # (counted before the forms below: chunked_long_matmuls slices gathered rows, which the count
    # would no longer follow; compile_onnx decides the matmul flags on this same count)
    gathered = gathered_row_matmuls(model, GATHERED_ROWS_MIN_K)
    untiled_matmuls = winograd and not _matmuls_data_tiled(gathered, im2col)
    if untiled_matmuls:
        rewrites += pointwise_convs_as_matmuls(model)
        rewrites += chunked_long_matmuls(model)  # before split_long_reductions: K >= LONG_REDUCTION too
    # IREE sums a long f32 reduction in order; its attentions are fused by fuse_online_attentions after the import
    rewrites += split_long_reductions(model, fused_attentions=True)
    rewrites += row_max_pools_as_reductions(model)
    rewrites += channels_last_concats(model)  # before the Winograd form reads the Concat channels-last
    if winograd:  # stride-1 3x3 convs with enough channels (and stride-2 ones on their inputs)
        rewrites += winograd_convs(model, tiled_products=not untiled_matmuls)
    if im2col:
        rewrites += shifted_output_convs(model)  # the other stride-1 convs
    rewrites += cancel_transpose_pairs(model)  # what the forms above left back to back
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return IreeForm(rewrites, model.graph.name, gathered)


# ---------------------------------------------------------------------------------------------
# static shapes


# how padding rows are made harmless -> what metadata.json and docs say about it
PADDINGS = {
    "repeat": "padding rows repeat row 0 (a real voxel: same points, count and coordinates); each voxel's "
    "features depend only on its own row and the BEV scatter writes them to that pillar's cell again, "
    "so the canvas and every output are those of the unpadded input",
    "invalid": "padding rows are zeros with coordinates -1, which the padded DynamicScatter and BEV scatter "
    "ignore (as mmcv ignores points outside the range), so every output is that of the unpadded input",
}


def padding_rule(patches: Sequence[str], input_names: Sequence[str]) -> str | None:
    """How this wrapper's inputs can be padded to a fixed row count without changing its outputs,
    or None. Hard-voxel pillar models scatter each voxel independently (``repeat``); the
    dynamic-voxel patches ignore rows with negative coordinates (``invalid``). Sparse-convolution
    models on hard voxels would see a repeated voxel as a duplicate site: not offered."""
    sparse = any(p.startswith("spconv.") for p in patches)
    if "pillar_scatter.vectorized" in patches and not sparse and "num_points" in input_names:
        return "repeat"
    if any(p.endswith(".padded") for p in patches) and "coors" in input_names:
        return "invalid"
    return None


def pad_inputs(
    arrays: dict[str, np.ndarray], static: dict[str, dict], padding: str
) -> dict[str, np.ndarray]:
    """Pad each input along its pinned axis to the static size (see ``PADDINGS``)."""
    out = dict(arrays)
    for dim, spec in static.items():
        size = spec["size"]
        for name, axis in spec["inputs"].items():
            a = np.asarray(out[name])
            n = a.shape[axis]
            if n > size:
                raise ExportError(f"{name} has {n} rows ({dim}); the vmfb was compiled for at most {size}")
            if n == size:
                continue
            if padding == "repeat":
                fill = np.repeat(np.take(a, [0], axis=axis), size - n, axis=axis)
            else:
                shape = list(a.shape)
                shape[axis] = size - n
                fill = np.full(shape, -1 if name == "coors" else 0, a.dtype)
            out[name] = np.concatenate([a, fill], axis=axis)
    return out


# ---------------------------------------------------------------------------------------------
# compile


@dataclass
class IreeOptions:
    """What the user asked for: a flags preset and, optionally, a static size for the dynamic dims."""

    preset: str = DEFAULT_PRESET
    static: int | None = None  # pin every dynamic dim to this many rows (inputs padded)


def compile_onnx(
    onnx_path: Path,
    vmfb_path: Path,
    preset: str = DEFAULT_PRESET,
    static: dict[str, dict] | None = None,
    padding: str | None = None,
    extra_flags: Sequence[str] = (),
) -> Compiled:
    """``model.onnx`` -> ``model.vmfb`` for llvm-cpu; an ExportError names what failed.

    ``static``: ``{dim: {"size": N, "inputs": {name: axis}}}`` pins those dims (the caller pads
    inputs with ``pad_inputs`` and ``padding``)."""
    flags = [*BASE_FLAGS, *preset_flags(preset), *extra_flags]
    info = Compiled(preset, flags[len(BASE_FLAGS) :], dict(static or {}), padding, host_isa=host_isa())
    with tempfile.TemporaryDirectory(prefix="mmdet3d-iree-") as tmp:
        rewritten, mlir = Path(tmp) / "model.onnx", Path(tmp) / "model.mlir"
        start = time.perf_counter()
        sizes = {dim: spec["size"] for dim, spec in info.static.items()}
        form = iree_onnx(onnx_path, rewritten, sizes, im2col=IM2COL_CONVS in flags, winograd=DATA_TILING in flags,
                         conv_tiling=CONV_DATA_TILING in flags)
        info.rewrites, info.function = form.rewrites, form.function
        dynamic_rows = form.gathered[0]
        if MATMUL_DATA_TILING in flags and not _matmuls_data_tiled(form.gathered, IM2COL_CONVS in flags):
            flags.remove(MATMUL_DATA_TILING)  # see GATHERED_ROWS_MIN_K
        # data-tiled matmuls run IREE's mmt4d kernels, which are not vectorised with masks
        peel = VECTOR_PEELING in flags and dynamic_rows > 0 and MATMUL_DATA_TILING not in flags
        if VECTOR_PEELING in flags:
            flags.remove(VECTOR_PEELING)  # only for some dispatches: see VECTOR_PEELING
        _run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(rewritten), "-o", str(mlir)], "iree-import-onnx")
        if fused := fuse_online_attentions(mlir):
            info.rewrites.append(f"{fused} OnlineAttention node(s) as iree_linalg_ext.online_attention")
        info.import_s = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        # matmuls not data-tiled where convolutions are (host on AVX-512, GATHERED_ROWS_MIN_K): WIDE_MATMUL_TILES
        widen = CONV_DATA_TILING in flags and MATMUL_DATA_TILING not in flags
        if peel or widen:  # the dispatches' configurations are chosen here
            if peel:
                configured, peeled = _peel_dynamic_row_matmuls(mlir, flags, Path(tmp))
                info.rewrites.append(f"{peeled} dynamic-row matmul dispatches vectorised with peeled loops ({VECTOR_PEELING})")
            else:
                configured = Path(tmp) / "configured.mlir"
                _run([_tool("iree-compile"), *flags, str(mlir), f"--compile-to={CONFIGURED}", "-o", str(configured)], "iree-compile")
            if widen and (widened := _widen_matmul_tiles(configured)):
                tiles = WIDE_MATMUL_TILES
                info.rewrites.append(
                    f"{widened} static matmul(s) not data-tiled with {tiles['vector_columns']}-column vector tiles and K steps "
                    f"of {tiles['k_step']} (WIDE_MATMUL_TILES)"
                )
            _run([_tool("iree-compile"), str(configured), *flags, f"--compile-from={CONFIGURED}", "-o", str(vmfb_path)], "iree-compile")
        else:
            _run([_tool("iree-compile"), str(mlir), *flags, "-o", str(vmfb_path)], "iree-compile")
        info.flags = flags[len(BASE_FLAGS) :]
        info.compile_s = round(time.perf_counter() - start, 3)
    return info


# the compilation phase whose output holds every dispatch with its codegen configuration
CONFIGURED = "executable-configurations"
# a dispatch whose matmul multiplies a dynamic row count (its LHS ``tensor<?xKxf32>``)
_DYNAMIC_ROW_MATMUL = re.compile(r"linalg\.matmul \{[^\n]*ins\([^\n]*: tensor<\?x\d+xf32>, tensor<\d+x\d+xf32>\)")


def _peel_dynamic_row_matmuls(mlir: Path, flags: list[str], tmp: Path) -> tuple[Path, int]:
    """Configure the dispatches of ``mlir`` twice, with IREE's own choices with and without
    ``VECTOR_PEELING``; keep the peeled configuration of the dispatches whose matmul has a dynamic
    row count and the other one elsewhere. Returns the configured module (to compile with
    ``--compile-from=CONFIGURED``) and how many dispatches took the peeled configuration."""
    sources, configured = tmp / "sources.mlir", tmp / "configured.mlir"
    compile_ = [_tool("iree-compile"), *flags]
    _run([*compile_, str(mlir), "--compile-to=executable-sources", "-o", str(sources)], "iree-compile")
    texts = {}
    for peel in (False, True):
        out = tmp / f"configured_{peel}.mlir"
        phases = ["--compile-from=executable-sources", f"--compile-to={CONFIGURED}"]
        _run([*compile_, *([VECTOR_PEELING] if peel else []), *phases, str(sources), "-o", str(out)], "iree-compile")
        texts[peel] = out.read_text().split("\n")
    masked, peeled = _executables(texts[False]), _executables(texts[True])
    if masked.keys() != peeled.keys():
        raise ExportError("iree-compile formed different dispatches with and without loop peeling")
    lines, last, count = [], 0, 0
    for name, (begin, end) in masked.items():  # in file order
        lines += texts[False][last:begin]
        p_begin, p_end = peeled[name]
        if any(_DYNAMIC_ROW_MATMUL.search(line) for line in texts[True][p_begin:p_end]):
            lines += texts[True][p_begin : p_end + 1]
            count += 1
        else:
            lines += texts[False][begin : end + 1]
        last = end + 1
    configured.write_text("\n".join(lines + texts[False][last:]))
    return configured, count


# IREE's configuration of a static matmul that is not data-tiled, on a 64-byte vector target
_NARROW_MATMUL_CONFIG = re.compile(
    r"lowering_config<distribution = \[(\d+), 64, 0\], vector_common_parallel = \[(\d+), 16, 0\], vector_reduction = \[0, 0, 16\]>"
)
# ... of a product that reads B as [K, N]: a named matmul, or a generic with its indexing maps
_ROWS_TIMES_COLUMNS = re.compile(
    r"= linalg\.matmul \{lowering_config|= linalg\.generic \{indexing_maps = \[affine_map<\(d0, d1, d2\) -> \(d0, d2\)>, "
    r"affine_map<\(d0, d1, d2\) -> \(d2, d1\)>, affine_map<\(d0, d1, d2\) -> \(d0, d1\)>\], "
    r'iterator_types = \["parallel", "parallel", "reduction"\]\}'
)
_MATMUL_COLUMNS = re.compile(r"outs\(%[\w.#]+ : tensor<(?:\?|\d+)x(\d+)xf32>\)")


def _widen_matmul_tiles(configured: Path) -> int:
    """Rewrite, in place, IREE's configuration of the static matmuls of ``configured`` (the
    ``CONFIGURED`` phase's module) that read B as [K, N], have N a multiple of 32 and run on a
    64-byte vector target: ``WIDE_MATMUL_TILES``. Returns how many were rewritten. Tile sizes only:
    each output still sums its K products in order."""
    tiles, count, wide = WIDE_MATMUL_TILES, 0, False
    out = configured.with_suffix(".wide.mlir")
    with configured.open() as src, out.open("w") as dst:
        for line in src:
            if "hal.executable.variant" in line:
                wide = "native_vector_size = 64 :" in line
            elif wide and "lowering_config<distribution" in line and _ROWS_TIMES_COLUMNS.search(line):
                config, columns = _NARROW_MATMUL_CONFIG.search(line), _MATMUL_COLUMNS.search(line)
                n = int(columns.group(1)) if columns else None  # N unread: IREE's configuration stays
                if config and n and n % tiles["vector_columns"] == 0:
                    rows, vector_rows = config.group(1, 2)
                    workgroup = next((c for c in tiles["workgroup_columns"] if n % c == 0), 64)
                    line = line.replace(
                        config.group(0),
                        f"lowering_config<distribution = [{rows}, {workgroup}, 0], vector_common_parallel = "
                        f"[{vector_rows}, {tiles['vector_columns']}, 0], vector_reduction = [0, 0, {tiles['k_step']}]>",
                    )
                    count += 1
            dst.write(line)
    out.replace(configured)
    return count


# the custom node of ``graph_forms.split_long_reductions``' fused attentions as iree-import-onnx writes it
_VTENSOR = r"!torch\.vtensor<\[([\d,]+)\],f32>"
_ONLINE_ATTENTION = re.compile(
    r'^(\s*)(%[\w.$-]+):3 = torch\.operator "onnx\.' + ONLINE_ATTENTION[1] + r'"\((%\S+), (%\S+), (%\S+)\) : '
    rf"\({_VTENSOR}, {_VTENSOR}, {_VTENSOR}\) -> \({_VTENSOR}, {_VTENSOR}, {_VTENSOR}\)\s*$"
)


def fuse_online_attentions(mlir: Path) -> int:
    """Replace each fused-attention node of the imported ``mlir`` (``graph_forms.split_long_reductions``
    with ``fused_attentions``), in place, by IREE's ``iree_linalg_ext.online_attention`` over its
    blocks (the blocks are a batch dim; a batch's queries are read by all its blocks). Returns how
    many were replaced."""
    marker = f'"onnx.{ONLINE_ATTENTION[1]}"'
    with mlir.open() as text:  # streamed: most modules have none, and their weights make the text large
        if not any(marker in line for line in text):
            return 0
    lines, count = mlir.read_text().split("\n"), 0
    for i, line in enumerate(lines):
        match = _ONLINE_ATTENTION.match(line)
        if match is None:
            continue
        indent, result, *operands = match.group(1, 2, 3, 4, 5)
        shapes = [[int(d) for d in match.group(j).split(",")] for j in range(6, 12)]
        p = f"%online{count}_"
        lines[i] = "\n".join(indent + row for row in _online_attention(p, operands, *shapes))
        for j, part in enumerate(("acc", "max", "sum")):  # the node's results, read later in the function
            use = re.compile(re.escape(f"{result}#{j}") + r"(?![\w.$-])")
            lines[i + 1 :] = [use.sub(p + part, later) for later in lines[i + 1 :]]
        count += 1
    if any(marker in line for line in lines):  # an import form this function does not know
        raise ExportError(f"iree-import-onnx wrote an {ONLINE_ATTENTION[1]} node that codegen.iree.fuse_online_attentions does not match")
    mlir.write_text("\n".join(lines))
    return count


def _online_attention(p: str, operands: list[str], qs, ks, vs, acc_s, max_s, sum_s) -> list[str]:
    """The MLIR of one ``fuse_online_attentions`` replacement (value names prefixed ``p``): ``Q
    [.., M, C]``, ``K [.., a, b, C]``, ``V [.., a, b, N]`` -> ``{p}acc [.., a, M, N]``, ``{p}max``
    and ``{p}sum [.., a, M, 1]``."""
    batch, a, m, n = len(qs) - 2, ks[-3], qs[-2], vs[-1]
    acc, row, col = [*qs[:-2], a, m, n], [*qs[:-2], a, m], [*qs[:-2], a, m, 1]
    if ks[:batch] != qs[:batch] or vs[:-1] != ks[:-1] or ks[-1] != qs[-1] or [acc_s, max_s, sum_s] != [acc, col, col]:
        raise ExportError(f"an {ONLINE_ATTENTION[1]} node has shapes {qs}, {ks}, {vs} -> {acc_s}, {max_s}, {sum_s}")

    def ty(shape) -> str:
        return "tensor<" + "x".join(map(str, shape)) + "xf32>"

    def vt(shape) -> str:
        return "!torch.vtensor<[" + ",".join(map(str, shape)) + "],f32>"

    bd = [f"d{j}" for j in range(batch)]
    dims = ", ".join([*bd, "a", "m", "n", "k1", "k2"])

    def amap(*idx) -> str:
        return f"affine_map<({dims}) -> ({', '.join(idx)})>"

    maps = [amap(*bd, "m", "k1"), amap(*bd, "a", "k2", "k1"), amap(*bd, "a", "k2", "n"), amap(), amap(*bd, "a", "m", "n"), amap(*bd, "a", "m"), amap(*bd, "a", "m")]
    expand = "[" + ", ".join([f"[{j}]" for j in range(len(row) - 1)] + [f"[{len(row) - 1}, {len(row)}]"]) + "]"
    rows = [f"{p}{x} = torch_c.to_builtin_tensor {o} : {vt(s)} -> {ty(s)}" for x, o, s in zip("qkv", operands, (qs, ks, vs))]
    rows += [
        f"{p}scale = arith.constant 1.000000e+00 : f32",
        f"{p}zero = arith.constant 0.000000e+00 : f32",
        f"{p}lowest = arith.constant -3.40282347E+38 : f32",
        f"{p}acc_empty = tensor.empty() : {ty(acc)}",
        f"{p}row_empty = tensor.empty() : {ty(row)}",
        f"{p}acc0 = linalg.fill ins({p}zero : f32) outs({p}acc_empty : {ty(acc)}) -> {ty(acc)}",
        f"{p}max0 = linalg.fill ins({p}lowest : f32) outs({p}row_empty : {ty(row)}) -> {ty(row)}",
        f"{p}sum0 = linalg.fill ins({p}zero : f32) outs({p}row_empty : {ty(row)}) -> {ty(row)}",
        f"{p}r:3 = iree_linalg_ext.online_attention <indexing_maps = [{', '.join(maps)}]>"
        f" ins({p}q, {p}k, {p}v, {p}scale : {ty(qs)}, {ty(ks)}, {ty(vs)}, f32)"
        f" outs({p}acc0, {p}max0, {p}sum0 : {ty(acc)}, {ty(row)}, {ty(row)}) {{",
        "^bb0(%score: f32):",
        "  iree_linalg_ext.yield %score : f32",
        f"}} -> {ty(acc)}, {ty(row)}, {ty(row)}",
        f"{p}acc = torch_c.from_builtin_tensor {p}r#0 : {ty(acc)} -> {vt(acc)}",
    ]
    for j, part in ((1, "max"), (2, "sum")):
        rows += [
            f"{p}{part}_col = tensor.expand_shape {p}r#{j} {expand} output_shape [{', '.join(map(str, col))}] : {ty(row)} into {ty(col)}",
            f"{p}{part} = torch_c.from_builtin_tensor {p}{part}_col : {ty(col)} -> {vt(col)}",
        ]
    return rows


def _executables(lines: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (first line, last line)}`` of the module's ``hal.executable`` ops, in file order
    (printed MLIR: each opens with ``  hal.executable private @name {`` and closes with ``  }``)."""
    found, i = {}, 0
    while i < len(lines):
        if match := re.match(r"  hal\.executable private @(\S+) \{$", lines[i]):
            end = lines.index("  }", i + 1)
            found[match.group(1)] = (i, end)
            i = end
        i += 1
    return found


def _tool(name: str) -> str:
    """The IREE tool installed beside this Python (the .venv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        errors = [line.strip() for line in lines if "error:" in line]
        reason = errors[0].split("error:", 1)[1].strip() if errors else (lines[-1] if lines else f"exit {proc.returncode}")
        raise ExportError(f"{what} failed: {reason}")


# ---------------------------------------------------------------------------------------------
# run


def iree_runtime(
    vmfb_path: Path, input_names: Sequence[str], static: dict | None = None, padding: str | None = None
) -> Runtime:
    """A Runtime running the vmfb's entry function on iree-base-runtime's ``local-task`` driver.

    A vmfb compiled for static shapes gets its inputs padded first; without ``static`` the
    ``iree`` section of the metadata.json beside the vmfb says whether it was."""
    import iree.runtime as ireert

    from .validate import Runtime

    retain_freed_memory()
    vmfb_path = Path(vmfb_path)
    if static is None:
        meta = vmfb_path.parent / "metadata.json"
        section = json.loads(meta.read_text()).get("iree", {}) if meta.is_file() else {}
        static, padding = section.get("static") or {}, section.get("padding")
    module = ireert.load_vm_flatbuffer_file(str(vmfb_path), driver="local-task")
    names = [n for n in module.vm_module.function_names if not n.startswith("__") and not n.endswith("$async")]
    entry = module["main_graph"] if "main_graph" in names else module[names[0]]

    def run(args):
        arrays = {n: a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for n, a in zip(input_names, args)}
        if static:
            arrays = pad_inputs(arrays, static, padding)
        out = entry(*(arrays[n] for n in input_names))
        out = out if isinstance(out, (tuple, list)) else [out]
        return [np.asarray(o.to_host()) for o in out]

    return Runtime("iree", run)
