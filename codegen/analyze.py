"""Step 5: walk the sample pytree and describe every leaf.

The result (``Analysis``) is plain data and the single source for the wrapper template,
metadata.json and the ONNX input/output names: path, flat name, shape, dtype, meaning and
dynamic axes of every tensor; the non-tensor leaves (box_type_3d, img_shape, ...) as constants.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

# the second path component of an input decides the name of its dynamic leading axis
DIM_NAMES = {"voxels": "num_voxels", "points": "num_cloud_points", "imgs": "num_images"}

BOX_DESCRIPTIONS = {
    "bboxes_3d": "decoded boxes (x, y, z, x_size, y_size, z_size, yaw, ...), sorted by score, zero rows after num_boxes",
    "scores_3d": "box scores, descending; zero after num_boxes",
    "labels_3d": "class index of each box; zero after num_boxes",
    "num_boxes": "number of valid rows in bboxes_3d / scores_3d / labels_3d",
}


HEAD_DESCRIPTIONS = {
    "cls_score": "class logits per anchor and BEV cell (sigmoid -> score)",
    "bbox_pred": "box deltas per anchor and BEV cell (encoded against the anchors)",
    "dir_cls_pred": "direction-bin logits per anchor and BEV cell",
    "heatmap": "class-centre heatmap logits per BEV cell",
    "reg": "sub-cell offset (x, y) of the box centre",
    "height": "box centre height z",
    "dim": "log box size (x_size, y_size, z_size)",
    "rot": "yaw as (sin, cos)",
    "vel": "velocity (vx, vy)",
}


@dataclass
class TensorSpec:
    path: str  # "inputs.voxels.voxels"
    name: str  # flat identifier used by the wrapper, ONNX and inputs.npz
    shape: list[int]  # as sampled
    dtype: str  # "float32"
    description: str
    access: str = ""  # Python expression reading it from the nested data, e.g. data["inputs"]["voxels"]
    dynamic: dict[int, str] = field(default_factory=dict)  # axis -> dim name
    used: bool = True  # consumed by the wrapper's forward

    @property
    def symbolic_shape(self) -> list:
        return [self.dynamic.get(i, s) for i, s in enumerate(self.shape)]


@dataclass
class Constant:
    path: str
    value: str  # a short, deterministic rendering


@dataclass
class Analysis:
    inputs: list[TensorSpec]  # every tensor of the sample
    constants: list[Constant]
    outputs: list[TensorSpec]
    structure: Any  # nested dicts/lists with "Tensor[...]" strings: metadata's input_structure
    batch_size: int

    @property
    def used_inputs(self) -> list[TensorSpec]:
        return [t for t in self.inputs if t.used]

    def dynamic_dims(self) -> dict[str, dict[str, int]]:
        """dim name -> {input name: axis}, in input order."""
        dims: dict[str, dict[str, int]] = {}
        for t in self.used_inputs:
            for axis, dim in sorted(t.dynamic.items()):
                dims.setdefault(dim, {})[t.name] = axis
        return dims

    def to_json(self) -> dict:
        return {
            "inputs": [asdict(t) for t in self.inputs],
            "constants": [asdict(c) for c in self.constants],
            "outputs": [asdict(t) for t in self.outputs],
        }


class Namer:
    """Hands out unique, valid Python identifiers (shortest distinguishing path suffix)."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    @staticmethod
    def clean(text: str) -> str:
        text = re.sub(r"\W+", "_", text).strip("_").lower() or "tensor"
        if text[0].isdigit():
            text = "t_" + text
        return text + "_" if keyword.iskeyword(text) else text

    def name(self, parts: list[str]) -> str:
        parts = [p for p in parts if p]
        for k in range(1, len(parts) + 1):
            candidate = self.clean("_".join(parts[-k:]))
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate
        base, i = self.clean("_".join(parts)), 1
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(path: list[str], shape: list[int], channels: list[str]) -> str:
    key = path[-1] if not path[-1].isdigit() else path[-2]
    chans = ", ".join(channels[: shape[-1]]) if shape and channels and len(channels) >= shape[-1] else ""
    chans = f" ({chans})" if chans else ""
    if key == "voxels" and "voxels" in path[:-1] and len(shape) == 2:
        # dynamic voxelization: the points themselves, not grouped (their coors say the voxel)
        return f"points, one row per point (dynamic voxelization: coors gives each one's voxel){chans}"
    if "voxels" in path[:-1] or path[-1] == "voxels":
        table = {
            "voxels": f"points grouped by voxel, zero-padded to {shape[1] if len(shape) > 1 else '?'} points per voxel{chans}",
            "num_points": "number of valid points in each voxel (the rest of its row is padding)",
            "coors": "integer voxel coordinates (batch index, z, y, x) in the voxel grid",
            "voxel_centers": "metric centre (x, y, z) of each voxel",
        }
        if key in table:
            return table[key]
    table = {
        "points": f"point cloud after the test pipeline, one row per point{chans}",
        "imgs": "camera images after normalisation (batch, views, C, H, W)"
        if len(shape) == 5
        else "camera image after normalisation (batch, C, H, W)",
        "img": "camera image after normalisation (C, H, W)",
        # multi-view camera models (sample.CAMERA_META): [batch, views, 4, 4]
        "lidar2img": "per camera: lidar -> image projection (4x4, pixels of the original image)",
        "cam2img": "per camera: intrinsics (4x4, pixels of the original image)",
        "cam2lidar": "per camera: camera -> lidar transform (4x4)",
        "img_aug_matrix": "per camera: the test pipeline's image resize/crop (4x4)",
        "lidar_aug_matrix": "lidar augmentation (4x4, identity at test time)",
    }
    return table.get(key, f"tensor at {'.'.join(path)}")


def _render_value(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, np.ndarray):
        return f"ndarray{list(value.shape)} {value.dtype}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value):
        return repr(list(value))
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{len(value)}]"
    if hasattr(value, "__name__"):
        return str(value.__name__)
    return type(value).__name__


def _children(node: Any) -> Iterable[tuple[str, str, Any]] | None:
    """(path part, access suffix, child) for containers; None for leaves."""
    from mmengine.structures import BaseDataElement

    if isinstance(node, dict):
        return [(str(k), f"[{k!r}]", node[k]) for k in sorted(node, key=str)]
    if isinstance(node, (list, tuple)):
        return [(str(i), f"[{i}]", v) for i, v in enumerate(node)]
    if isinstance(node, BaseDataElement):
        items = [("metainfo", ".metainfo", dict(node.metainfo))]
        items += [(k, f".{k}", getattr(node, k)) for k in sorted(node.keys())]
        return items
    return None


def walk(tree: Any, root: str = "data") -> tuple[list[tuple[list[str], str, Any]], Any]:
    """All leaves as (path parts, access expression, value), plus a printable structure."""
    leaves: list[tuple[list[str], str, Any]] = []

    def rec(node: Any, parts: list[str], access: str) -> Any:
        kids = _children(node)
        if kids is None:
            leaves.append((parts, access, node))
            if isinstance(node, torch.Tensor):
                return f"Tensor{list(node.shape)} {dtype_name(node.dtype)}"
            return _render_value(node)
        shaped = {p: rec(v, parts + [p], access + a) for p, a, v in kids}
        if isinstance(node, (list, tuple)):
            return list(shaped.values())
        if not isinstance(node, dict):
            return {"__type__": type(node).__name__, **shaped}
        return shaped

    structure = rec(tree, [], root)
    return leaves, structure


def analyze(
    data: dict,
    variant: dict,
    used_prefixes: tuple[str, ...],
    channels: list[str],
) -> Analysis:
    """Describe the sample ``data`` (a data_preprocessor output).

    ``variant`` is the same frame with a different point count: axes whose size differs between
    the two are the dynamic ones. ``used_prefixes`` says which tensors the model's tensor path
    reads (e.g. ``("inputs.voxels",)``). Outputs are added by ``analyze_outputs`` (step 6).
    """
    leaves, structure = walk(data)
    other = {".".join(p): v for p, _, v in walk(variant)[0]}
    namer = Namer()
    inputs: list[TensorSpec] = []
    constants: list[Constant] = []
    for parts, access, value in leaves:
        path = ".".join(parts)
        if not isinstance(value, torch.Tensor):
            constants.append(Constant(path, _render_value(value)))
            continue
        used = any(path == p or path.startswith(p + ".") for p in used_prefixes)
        shape = list(value.shape)
        dynamic = {}
        twin = other.get(path)
        if isinstance(twin, torch.Tensor) and twin.dim() == value.dim():
            for axis, (a, b) in enumerate(zip(shape, twin.shape)):
                if a != b:
                    dynamic[axis] = DIM_NAMES.get(parts[1] if len(parts) > 1 else "", f"dim_{parts[-1]}_{axis}")
        name = namer.name([p for p in parts[1:] if not p.isdigit()] or parts) if used else ""
        inputs.append(
            TensorSpec(path, name, shape, dtype_name(value.dtype), describe(parts, shape, channels), access, dynamic, used)
        )
    # wrapper inputs in the order the recipe lists them (the model's own argument order)
    rank = {p: i for i, p in enumerate(used_prefixes)}
    first = lambda t: min((rank[p] for p in used_prefixes if t.path == p or t.path.startswith(p + ".")), default=len(rank))
    inputs.sort(key=lambda t: (not t.used, first(t) if t.used else 0))
    batch_size = len(data.get("data_samples") or []) or 1
    return Analysis(inputs, constants, [], structure, batch_size)


def analyze_outputs(
    outputs: Any, groups: tuple[str, ...], root: str = "head_outputs", descriptions: dict | None = None
) -> list[TensorSpec]:
    """Flatten an output pytree into named tensors with access expressions below ``root``
    (``descriptions``: the head's own meaning of its output names, before HEAD_DESCRIPTIONS)."""
    leaves, _ = walk(outputs, root=root)
    namer = Namer()
    specs = []
    for parts, access, value in leaves:
        if not isinstance(value, torch.Tensor):
            continue
        named = list(parts)
        if named and named[0].isdigit() and len(groups) == 1 and "{}" in groups[0]:
            named[0] = groups[0].format(named[0])  # one group per task: "task{}"
        elif named and named[0].isdigit() and int(named[0]) < len(groups):
            named[0] = groups[int(named[0])]
        # drop list indices of single-element lists (one feature level / one sample)
        kept = []
        node = outputs
        for raw, shown in zip(parts, named):
            container = node
            node = node[int(raw)] if isinstance(node, (list, tuple)) else node[raw]
            if isinstance(container, (list, tuple)) and len(container) == 1 and raw.isdigit():
                continue
            kept.append(shown)
        name = namer.name(["_".join(kept)])
        table = BOX_DESCRIPTIONS if root == "decoded" else {**HEAD_DESCRIPTIONS, **(descriptions or {})}
        key = next((p for p in reversed(kept) if p in table), name)
        what = table.get(key, f"head output {name}")
        specs.append(TensorSpec(".".join(parts), name, list(value.shape), dtype_name(value.dtype), what, access))
    return specs
