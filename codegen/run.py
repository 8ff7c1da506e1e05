"""``run``: an exported model (PT2, ONNX or IREE vmfb) on a point-cloud file, boxes out.

    mmdet3d-export run EXPORT_DIR_OR_MODEL_FILE --points FILE [--format pt2|onnx|vmfb] [--output-dir D]

The point cloud goes through the same preprocessing as at export time (the config's test
pipeline and the model's data preprocessor, rebuilt from ``metadata.json``), the exported graph
runs on the flat inputs named in ``metadata.json``, and:

- a model exported with ``--outputs boxes`` already returns ``bboxes_3d/scores_3d/labels_3d/num_boxes``;
- a model exported with head outputs has them regrouped (each output's ``source`` path in
  metadata.json says where it sat in the head's nested outputs) and decoded by the recipe's
  export-friendly decoder (``codegen.boxes``), the same code ``--outputs boxes`` exports.

Writes ``<stem>.boxes.json`` and ``<stem>.bev.png`` (bird's-eye view of the points with the boxes,
labelled by class) into the output directory, and prints the boxes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import sample as smp
from .boxes import BOX_OUTPUTS
from .errors import ExportError
from .validate import onnx_runtime

MODEL_FILES = {"pt2": "model.pt2", "onnx": "model.onnx", "vmfb": "model.vmfb"}


@dataclass
class Detections:
    boxes: np.ndarray  # [n, 7+] (x, y, z, x_size, y_size, z_size, yaw, ...)
    scores: np.ndarray  # [n]
    labels: np.ndarray  # [n]
    class_names: list[str]

    def to_json(self) -> list[dict]:
        return [
            {
                "label": int(label),
                "class": (
                    self.class_names[label]
                    if 0 <= label < len(self.class_names)
                    else str(int(label))
                ),
                "score": round(float(score), 6),
                "box": [round(float(v), 5) for v in box],
            }
            for box, score, label in zip(self.boxes, self.scores, self.labels)
        ]


def locate(target: Path, fmt: str | None) -> tuple[Path, str, dict]:
    """(model file, format, metadata) from a model file or an export directory."""
    if not target.exists():
        raise ExportError(f"exported model not found: {target}")
    if target.is_dir():
        folder = target
        available = [f for f, name in MODEL_FILES.items() if (folder / name).is_file()]
        if fmt is None:
            if not available:
                raise ExportError(
                    f"{folder} holds no exported model ({', '.join(MODEL_FILES.values())})"
                )
            fmt = available[0]
        model_file = folder / MODEL_FILES[fmt]
    else:
        folder, model_file = target.parent, target
        fmt = fmt or model_file.suffix.lstrip(".")
    if fmt not in MODEL_FILES:
        raise ExportError(
            f"unknown model format {fmt!r} ({model_file.name}); expected one of {', '.join(MODEL_FILES)}"
        )
    if not model_file.is_file():
        raise ExportError(f"exported model not found: {model_file}")
    meta_file = folder / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"no metadata.json beside {model_file}: run needs the export's metadata"
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"corrupt {meta_file}: {exc}") from None
    return model_file, fmt, meta


def load_runtime(
    model_file: Path, fmt: str, input_names: Sequence[str]
) -> Callable[[tuple], list[np.ndarray]]:
    """Positional tensors in, numpy outputs out, whatever the format."""
    try:
        if fmt == "pt2":
            module = torch.export.load(str(model_file)).module()

            def run(args):
                with torch.no_grad():
                    out = module(*args)
                return [
                    np.asarray(o.detach().cpu())
                    for o in (out if isinstance(out, (tuple, list)) else [out])
                ]

            return run
        if fmt == "onnx":
            session = onnx_runtime(model_file, input_names)
            return lambda args: [np.asarray(o) for o in session.run(args)]
        from .iree import iree_runtime

        runtime = iree_runtime(model_file, input_names)
        return lambda args: [np.asarray(o) for o in runtime.run(args)]
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"cannot load {model_file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def pick(tree, path: str):
    """The leaf of a nested dict/list at a dotted path ("inputs.voxels.coors", "inputs.points.0")."""
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def regroup(sources: Sequence[str], values: Sequence) -> list:
    """Rebuild nested head outputs from flat values and their dotted source paths ("0.0", "0.0.reg")."""
    root: dict = {}
    for source, value in zip(sources, values):
        node = root
        *parents, last = source.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    def build(node):
        if not isinstance(node, dict):
            return node
        if all(k.isdigit() for k in node):
            return [build(node[k]) for k in sorted(node, key=int)]
        return {k: build(v) for k, v in node.items()}

    return build(root)


def class_names(cfg) -> list[str]:
    names = cfg.get("class_names")
    if names is None:
        try:
            names = cfg.test_dataloader.dataset.metainfo["classes"]
        except (AttributeError, KeyError, TypeError):
            names = []
    return list(names)


def detect(
    target: Path, points_file: Path, fmt: str | None = None, log=print
) -> tuple[Detections, dict]:
    """Preprocess ``points_file`` as at export time, run the exported model, decode the boxes."""
    from .configs import resolve_config
    from .generate import decode_boxes
    from .recipes import recipe_for

    model_file, fmt, meta = locate(target, fmt)
    cfg = smp.load_config(resolve_config(meta["model_config"]))
    recipe = recipe_for(cfg.model)
    boxes_exported = tuple(o["name"] for o in meta["outputs"]) == BOX_OUTPUTS
    if not boxes_exported and recipe.boxes is None:
        raise ExportError(
            f"{model_file.name} holds head outputs of recipe {recipe.name}, which has no box decoder yet"
        )
    # the data preprocessor (voxelization) and the head's decoder come from the config; neither
    # needs trained weights (anchors, box coder and test_cfg are configuration)
    model = smp.build_model(cfg, "cpu")
    s = smp.make_sample(model, cfg, points_file)
    input_names = meta["export_info"]["input_names"]
    paths = {
        t["name"]: t["path"]
        for t in meta["export_info"]["tensor_details"]
        if t.get("name")
    }
    args = tuple(pick(s.data, paths[name]).cpu() for name in input_names)
    outputs = load_runtime(model_file, fmt, input_names)(args)
    if boxes_exported:
        decoded = outputs
    else:
        head_outputs = regroup(
            [o["source"] for o in meta["outputs"]],
            [torch.from_numpy(o) for o in outputs],
        )
        with torch.no_grad():
            decoded = [np.asarray(t) for t in decode_boxes(model, recipe, head_outputs)]
    bboxes, scores, labels, count = decoded
    n = int(count)
    found = Detections(
        bboxes[:n], scores[:n], labels[:n].astype(np.int64), class_names(cfg)
    )
    info = {
        "model": str(model_file),
        "format": fmt,
        "points": str(points_file),
        "num_points": s.num_raw_points,
        "model_config": meta["model_config"],
        "point_cloud_range": smp.point_cloud_range(cfg),
        "cloud": np.asarray(pick(s.data, "inputs.points.0").cpu()),
    }
    return found, info


def box_corners_bev(box: np.ndarray) -> np.ndarray:
    """The 4 BEV corners (x, y) of a box (x, y, z, x_size, y_size, z_size, yaw)."""
    x, y, _, dx, dy, _, yaw = box[:7]
    local = np.array([[dx, dy], [-dx, dy], [-dx, -dy], [dx, -dy]]) / 2.0
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    return local @ rot.T + np.array([x, y])


def draw_bev(
    path: Path, cloud: np.ndarray, found: Detections, pcr: Sequence[float], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    fig, ax = plt.subplots(
        figsize=(9, 9 * (pcr[4] - pcr[1]) / max(pcr[3] - pcr[0], 1e-6)), dpi=110
    )
    ax.scatter(
        cloud[:, 0],
        cloud[:, 1],
        s=0.3,
        c=cloud[:, 2],
        cmap="Greys",
        alpha=0.6,
        linewidths=0,
    )
    colors = plt.get_cmap("tab10")
    for box, score, label in zip(found.boxes, found.scores, found.labels):
        corners = box_corners_bev(box)
        color = colors(int(label) % 10)
        ax.add_patch(
            Polygon(corners, closed=True, fill=False, edgecolor=color, linewidth=1.2)
        )
        front = corners[[0, 3]].mean(axis=0)  # the +x face: heading
        ax.plot([box[0], front[0]], [box[1], front[1]], color=color, linewidth=1.0)
        name = (
            found.class_names[label]
            if 0 <= label < len(found.class_names)
            else str(int(label))
        )
        ax.text(
            corners[:, 0].max(),
            corners[:, 1].max(),
            f"{name} {score:.2f}",
            color=color,
            fontsize=6,
        )
    ax.set_xlim(pcr[0], pcr[3])
    ax.set_ylim(pcr[1], pcr[4])
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    target: Path, points_file: Path, output_dir: Path, fmt: str | None = None, log=print
) -> dict:
    """detect() + print + write <stem>.boxes.json and <stem>.bev.png (both or neither)."""
    found, info = detect(target, points_file, fmt, log)
    stem = points_file.name.split(".")[0]
    result = {k: v for k, v in info.items() if k != "cloud"}
    result["num_boxes"] = len(found.scores)
    result["boxes"] = found.to_json()
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (
        output_dir / f"{stem}.boxes.json",
        output_dir / f"{stem}.bev.png",
    )
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".run-") as tmp:
        draw_bev(
            Path(tmp) / png_path.name,
            info["cloud"],
            found,
            info["point_cloud_range"],
            f"{Path(info['model']).name} ({info['format']}) on {points_file.name}: {len(found.scores)} boxes",
        )
        (Path(tmp) / json_path.name).write_text(json.dumps(result, indent=2) + "\n")
        os.replace(Path(tmp) / png_path.name, png_path)
        os.replace(Path(tmp) / json_path.name, json_path)
    for row in result["boxes"]:
        x, y, z, dx, dy, dz, yaw = row["box"][:7]
        log(
            f"{row['class']:<12} {row['score']:.3f}  x={x:7.2f} y={y:7.2f} z={z:6.2f}  "
            f"size={dx:.2f}x{dy:.2f}x{dz:.2f}  yaw={yaw:+.2f}"
        )
    log(f"{len(found.scores)} boxes -> {json_path}, {png_path}")
    return result
