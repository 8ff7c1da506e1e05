"""Steps 1-4: load the config, build the model, load a checkpoint, make a real sample.

The sample is what the model really sees: the frame goes through the config's own test
pipeline (as ``mmdet3d.apis.inference_detector`` does it) and the model's ``data_preprocessor``
(voxelization). Without a frame, a synthetic cloud shaped from the config (point dimensions,
point-cloud range) takes its place.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configs import ResolvedConfig
from .errors import ExportError

REPO_ROOT = Path(__file__).resolve().parent.parent

# the real frame each dataset's models are sampled on, relative to the data root
DEFAULT_FRAMES = {
    "KittiDataset": "kitti/000008.bin",
    "NuScenesDataset": "nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin",
    "SUNRGBDDataset": "sunrgbd/000017.bin",
    "ScanNetDataset": "scannet/scene0000_00.bin",
}
# the camera image each dataset's monocular models are sampled on (cam2img from the info .pkl
# beside it); a dataset without one here (Waymo) falls back to the nuScenes front camera
DEFAULT_IMAGES = {
    "KittiDataset": "kitti/000008.png",
    "NuScenesDataset": "nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg",
    # the nuImages 2D detectors' dataset: no nuImages frame is shared, a nuScenes camera image is one of its kind
    "CocoDataset": "nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg",
}
FALLBACK_IMAGE = DEFAULT_IMAGES["NuScenesDataset"]
SEED = 0


def data_root() -> Path:
    """Where the shared real frames live: $MMDET3D_EXPORT_DATA or ../shared/data beside the repo."""
    return Path(os.environ.get("MMDET3D_EXPORT_DATA", REPO_ROOT.parent / "shared" / "data"))


def load_config(resolved: ResolvedConfig, detail=None):
    """Load ``resolved``; ``detail`` (``--verbose`` lines) gets what ``migrate_mmdet2`` changed."""
    from mmengine.config import Config

    from .checkout import import_custom_modules

    try:
        cfg = Config.fromfile(str(resolved.path), import_custom_modules=False)
    except Exception as exc:  # syntax errors, missing _base_ files, ...
        raise ExportError(f"cannot load config {resolved.path}: {type(exc).__name__}: {exc}") from None
    if "model" not in cfg:
        raise ExportError(f"config {resolved.path} defines no 'model'")
    for change in migrate_mmdet2(cfg):
        if detail:
            detail(f"mmdet 2.x config migrated: {change}")
    # custom_imports (projects.BEVFusion.bevfusion, ...) with one clear error when they fail
    import_custom_modules(cfg, resolved.path)
    return cfg


# mmdet 3.x's DetDataPreprocessor settings of its ResNet configs: torchvision (pytorch-style) and caffe weights
_PYTORCH_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True)
_CAFFE_NORM = dict(mean=[103.53, 116.28, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False)


def migrate_mmdet2(cfg) -> list[str]:
    """Bring the 2D detector configs mmdet3d 1.4.0 still ships in mmdet 2.x form (nuImages Mask /
    Cascade R-CNN, HTC) to what mmdet 3.x builds and runs, in place; return what changed.

    - ``model.pretrained`` (a 2.x key mmdet 3.x rejects; the weights are not fetched anyway);
    - no ``data_preprocessor``: mmdet 3.x's ``DetDataPreprocessor`` with the normalisation of its
      own configs for the backbone's style (caffe or pytorch), padding to 32;
    - ``MultiScaleFlipAug(img_scale, [Resize(keep_ratio), RandomFlip])`` without flips: its one
      ``Resize(scale=img_scale, keep_ratio)``.
    Configs without these are untouched."""
    changes = []
    model = cfg.model
    if model.get("_scope_") != "mmdet" and not str(model.get("type", "")).startswith("mmdet."):
        return changes
    if "pretrained" in model:
        changes.append(f"model.pretrained ({model.pop('pretrained')}) dropped")
    if model.get("data_preprocessor") is None:
        caffe = (model.get("backbone") or {}).get("style") == "caffe"
        model["data_preprocessor"] = dict(type="DetDataPreprocessor", pad_size_divisor=32, **(_CAFFE_NORM if caffe else _PYTORCH_NORM))
        changes.append(f"model.data_preprocessor: DetDataPreprocessor ({'caffe' if caffe else 'pytorch'} normalisation)")
    pipeline = cfg.get("test_pipeline")
    if pipeline and any(step.get("type") == "MultiScaleFlipAug" for step in pipeline):
        steps = []
        for step in pipeline:
            if step.get("type") == "MultiScaleFlipAug" and not step.get("flip"):
                steps.append(dict(type="mmdet.Resize", scale=tuple(step["img_scale"]), keep_ratio=True))
            elif step.get("type") == "PackDetInputs":
                steps.append(dict(step, type="mmdet.PackDetInputs"))
            else:
                steps.append(step)
        cfg.test_pipeline = steps
        changes.append("test_pipeline: MultiScaleFlipAug -> Resize")
    return changes


def strip_pretrained(node, path: str = "model") -> list[str]:
    """Drop every ``init_cfg=dict(type='Pretrained', ...)`` from a model config, in place; return
    where. Building would download those weights (BEVFusion's Swin backbone: a GitHub URL): the
    export runs offline with random weights or the full ``--checkpoint`` instead."""
    stripped = []
    if isinstance(node, dict):
        init = node.get("init_cfg")
        inits = init if isinstance(init, (list, tuple)) else [init]
        if any(isinstance(i, dict) and i.get("type") == "Pretrained" for i in inits):
            kept = [i for i in inits if not (isinstance(i, dict) and i.get("type") == "Pretrained")]
            what = next(i for i in inits if isinstance(i, dict) and i.get("type") == "Pretrained")
            node["init_cfg"] = kept[0] if len(kept) == 1 else (kept or None)
            stripped.append(f"{path}.init_cfg (Pretrained {what.get('checkpoint')})")
        for key, value in node.items():
            stripped += strip_pretrained(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            stripped += strip_pretrained(value, f"{path}[{i}]")
    return stripped


def build_model(cfg, device: str = "cpu", log=None) -> torch.nn.Module:
    """Build the detector from the registry, randomly initialised with a fixed seed (pretrained
    sub-model weights named in the config are not fetched: ``strip_pretrained``)."""
    from mmengine.registry import init_default_scope

    cfg = copy.deepcopy(cfg)
    cfg.model.train_cfg = None
    for where in strip_pretrained(cfg.model):
        if log:
            log(f"not fetched: {where}")
    init_default_scope(cfg.get("default_scope", "mmdet3d"))
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    torch.manual_seed(SEED)
    try:
        model = MODELS.build(cfg.model)
    except Exception as exc:
        raise ExportError(f"cannot build model {cfg.model.get('type')}: {type(exc).__name__}: {exc}") from None
    model.cfg = cfg
    model.dataset_meta = {"classes": list(cfg.get("class_names", []))}
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike, log=print) -> dict:
    """Load a checkpoint into ``model`` strictly; ExportError on a corrupt file or key mismatch."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc):
            raise ExportError(f"checkpoint {path} is not a readable torch checkpoint ({type(exc).__name__})") from None
        log(f"warning: {path.name} holds more than tensors; loading it with full unpickling (trust the file)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ExportError(f"checkpoint {path} is not a readable torch checkpoint ({type(exc2).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ExportError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    state = ckpt.get("state_dict", ckpt)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(
            f"checkpoint {path.name} does not fit the model: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ExportError(
            f"checkpoint {path.name} does not fit the model: shape of {bad[0]} is "
            f"{tuple(state[bad[0]].shape)}, the model has {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict(state, strict=True)
    meta = ckpt.get("meta") or {}
    if isinstance(meta, dict) and isinstance(meta.get("dataset_meta"), dict):
        model.dataset_meta = meta["dataset_meta"]
    return ckpt


# ---------------------------------------------------------------- frames and the test pipeline


def _pipeline_cfg(cfg) -> list:
    if "test_dataloader" in cfg and "pipeline" in cfg.test_dataloader.dataset:
        return copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    if "test_pipeline" in cfg:
        return copy.deepcopy(cfg.test_pipeline)
    raise ExportError("config has no test pipeline (test_dataloader.dataset.pipeline or test_pipeline)")


def _points_loader(cfg) -> dict:
    for step in _pipeline_cfg(cfg):
        if step.get("type") == "LoadPointsFromFile":
            return step
    raise ExportError("the test pipeline has no LoadPointsFromFile step: not a point-cloud model")


# the columns of each dataset's point files, before the test pipeline picks and adds columns
FILE_CHANNELS = {
    "KittiDataset": ["x", "y", "z", "intensity"],
    "NuScenesDataset": ["x", "y", "z", "intensity", "ring/time"],
    "SUNRGBDDataset": ["x", "y", "z", "r", "g", "b"],
    "ScanNetDataset": ["x", "y", "z", "r", "g", "b"],
}


def point_channels(cfg) -> list[str]:
    """The meaning of each point column after LoadPointsFromFile: its ``use_dim`` picks file
    columns and ``shift_height`` puts the height above the floor after x, y, z (as mmdet3d
    does). Empty when the dataset's file columns are unknown or the config loads no points."""
    file_channels = FILE_CHANNELS.get(dataset_type(cfg))
    if not file_channels:
        return []
    try:
        loader = _points_loader(cfg)
    except ExportError:
        return []
    use_dim = loader.get("use_dim", loader.get("load_dim", len(file_channels)))
    picked = list(range(use_dim)) if isinstance(use_dim, int) else list(use_dim)
    channels = [file_channels[i] if i < len(file_channels) else f"column {i}" for i in picked]
    if loader.get("shift_height"):
        channels.insert(3, "height")
    return channels


def dataset_type(cfg) -> str:
    try:
        return str(cfg.test_dataloader.dataset.type)
    except AttributeError:
        return str(cfg.get("dataset_type", ""))


def default_frame_ref(cfg) -> str | None:
    """The shared real frame for this config's dataset, relative to the data root (a camera
    image for monocular models)."""
    if loads_mono_image(cfg) or loads_2d_image(cfg):
        return DEFAULT_IMAGES.get(dataset_type(cfg), FALLBACK_IMAGE)
    return DEFAULT_FRAMES.get(dataset_type(cfg))


def frame_ref(frame: str | os.PathLike | None, cfg) -> str | None:
    """What a wrapper records for a frame: relative to the data root when inside it."""
    if frame is None:
        return default_frame_ref(cfg)
    path = Path(frame).resolve()
    try:
        return path.relative_to(data_root().resolve()).as_posix()
    except ValueError:
        return str(frame)


def resolve_frame(ref: str | None, log=print) -> Path | None:
    """The file behind a frame reference, or None for a synthetic cloud (with a warning)."""
    if ref is None:
        return None
    path = Path(ref)
    if not path.is_absolute() and not path.is_file():
        path = data_root() / ref
    if path.is_file():
        return path
    if Path(ref).is_absolute() or Path(ref).parts[0] in (".", ".."):
        raise ExportError(f"point cloud not found: {ref}")
    log(f"warning: frame {ref} is not under the data root {data_root()}; using a synthetic cloud")
    return None


def point_cloud_range(cfg) -> list[float]:
    pcr = cfg.get("point_cloud_range")
    if pcr is None:
        for step in _pipeline_cfg(cfg):
            for inner in [step, *step.get("transforms", [])]:
                if inner.get("type") == "PointsRangeFilter":
                    pcr = inner["point_cloud_range"]
    return list(pcr) if pcr is not None else [-40.0, -40.0, -3.0, 40.0, 40.0, 1.0]


def read_points(frame: Path, load_dim: int) -> np.ndarray:
    """Read a float32 point file and check it: size, emptiness, NaN/inf."""
    if not frame.is_file():
        raise ExportError(f"point cloud not found: {frame}")
    raw = np.fromfile(frame, dtype=np.float32)
    if raw.size == 0:
        raise ExportError(f"empty point cloud: {frame} has no points")
    if raw.size % load_dim:
        raise ExportError(
            f"point cloud {frame} has {raw.size} floats, not a multiple of the {load_dim} values per point the config loads"
        )
    points = raw.reshape(-1, load_dim)
    bad = int((~np.isfinite(points)).sum())
    if bad:
        raise ExportError(f"point cloud {frame} has {bad} NaN/inf values")
    return points


def synthetic_points(cfg, n: int = 20000) -> np.ndarray:
    """A reproducible cloud inside the config's point-cloud range, with the loaded point width."""
    load_dim = int(_points_loader(cfg).get("load_dim", 4))
    lo, hi = np.array(point_cloud_range(cfg)[:3]), np.array(point_cloud_range(cfg)[3:])
    rng = np.random.default_rng(SEED)
    xyz = rng.uniform(lo, hi, size=(n, 3))
    extra = rng.uniform(0.0, 1.0, size=(n, max(load_dim - 3, 0)))
    return np.concatenate([xyz, extra], axis=1).astype(np.float32)


# metainfo matrices that multi-view camera models read (BEVFusion's view transform): the sample
# carries them as tensors, inputs["cam"][key] [batch, views, 4, 4] ([batch, 4, 4] for the lidar one)
CAMERA_META = ("lidar2img", "cam2img", "cam2lidar", "img_aug_matrix", "lidar_aug_matrix")


def loads_cameras(cfg) -> bool:
    """Does the test pipeline load multi-view camera images (``*MultiViewImage*`` loaders)?"""
    return any("MultiViewImage" in str(step.get("type")) for step in _pipeline_cfg(cfg))


def frame_info(frame: Path) -> dict:
    """The mmdet3d info entry of a frame: from a ``.pkl`` beside it whose ``data_list`` names the
    frame's lidar file (nuScenes: calibrations and the six camera images)."""
    import mmengine

    for pkl in sorted(frame.parent.glob("*.pkl")):
        try:
            infos = mmengine.load(str(pkl))
        except Exception:
            continue
        for info in (infos.get("data_list") if isinstance(infos, dict) else None) or []:
            lidar = (info.get("lidar_points") or {}).get("lidar_path") or ""
            if Path(lidar).name == frame.name:
                return info
    raise ExportError(
        f"the test pipeline loads camera images: no info .pkl beside {frame} describes the frame "
        "(its camera files and calibrations)"
    )


def camera_item(frame: Path) -> dict:
    """``images`` for the pipeline's multi-view loader, image paths made absolute (as
    ``mmdet3d.apis.inference_multi_modality_detector`` does)."""
    images = copy.deepcopy(frame_info(frame).get("images") or {})
    if not images:
        raise ExportError(f"the info entry of {frame} has no camera images")
    for cam in images.values():
        cam["img_path"] = str(frame.parent / Path(cam["img_path"]).name)
        if not Path(cam["img_path"]).is_file():
            raise ExportError(f"camera image not found: {cam['img_path']}")
    return {"images": images}


def camera_tensors(data_samples) -> dict[str, torch.Tensor]:
    """The ``CAMERA_META`` matrices present in every sample's metainfo, float32 (what the models
    make of them with ``imgs.new_tensor(np.asarray(...))``)."""
    metas = [s.metainfo for s in data_samples]
    return {
        key: torch.as_tensor(np.asarray([np.asarray(m[key]) for m in metas]), dtype=torch.float32)
        for key in CAMERA_META
        if all(key in m for m in metas)
    }


def run_pipeline(cfg, item: dict, label: str, kind: str = "frame") -> dict:
    """The config's own test pipeline on one data item (as mmdet3d.apis' inference functions run
    it); one ExportError line when it fails or drops the item (a ``kind`` named ``label``)."""
    import random

    from mmengine.dataset import Compose

    # random test-time steps (PointSample's np.random.choice in the SUN RGB-D / ScanNet configs)
    # draw from a seeded state: the same frame gives the same sample in every run (the caller's
    # random state is restored afterwards)
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(SEED)
    random.seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            packed = Compose(_pipeline_cfg(cfg))(item)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"the test pipeline failed on {label}: {type(exc).__name__}: {exc}") from None
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    if packed is None:
        raise ExportError(f"the test pipeline dropped the {kind} {label}")
    # a test-time-augmentation wrapper (MultiScaleFlipAug3D with Pack3DDetInputs inside) packs one
    # item per view: the first is the unflipped one at the first scale, what the model exports
    if isinstance(packed, list):
        packed = packed[0]
    if isinstance(packed.get("data_samples"), list):
        packed = {key: value[0] for key, value in packed.items()}
    return packed


def preprocess(model, packed: dict) -> dict:
    """A batch of one packed item through the model's data_preprocessor (voxelization, image
    normalisation and padding)."""
    from mmengine.dataset import pseudo_collate

    with torch.no_grad():
        return model.data_preprocessor(pseudo_collate([packed]), training=False)


@dataclass
class Sample:
    """One frame as the model sees it."""

    frame: str  # what the points came from (a path or "synthetic")
    num_raw_points: int
    data: dict  # data_preprocessor output: {"inputs": {...}, "data_samples": [...]}


def make_sample(model, cfg, frame: Path | None, keep_every: int = 1) -> Sample:
    """Run the config's test pipeline and the data preprocessor on a frame.

    ``keep_every=k`` keeps every k-th point of the frame: a second real sample with a
    different voxel count, for checking dynamic shapes without another file.
    """
    from mmdet3d.structures import get_box_type

    load_dim = int(_points_loader(cfg).get("load_dim", 4))
    if frame is None:
        points, label = synthetic_points(cfg), "synthetic"
    else:
        points, label = read_points(Path(frame), load_dim), str(frame)
    points = points[::keep_every]
    suffix = "".join(Path(frame).suffixes) if frame is not None else ".bin"
    with tempfile.TemporaryDirectory(prefix="mmdet3d-export-") as tmp:
        path = Path(frame) if frame is not None and keep_every == 1 else Path(tmp) / f"frame{suffix}"
        if not path.exists():
            np.ascontiguousarray(points).tofile(path)
        box_type_3d, box_mode_3d = get_box_type(cfg.test_dataloader.dataset.get("box_type_3d", "LiDAR"))
        item = dict(
            lidar_points=dict(lidar_path=str(path)),
            timestamp=1,
            axis_align_matrix=np.eye(4),
            box_type_3d=box_type_3d,
            box_mode_3d=box_mode_3d,
        )
        if loads_cameras(cfg):
            if frame is None:
                raise ExportError("the test pipeline loads camera images: a real frame is needed, not a synthetic cloud")
            item.update(camera_item(Path(frame)))
        packed = run_pipeline(cfg, item, label)
    packed["data_samples"].set_metainfo({"lidar_path": label})
    device = next(model.parameters()).device
    data = preprocess(model, packed)
    if "imgs" in data["inputs"]:
        data["inputs"]["cam"] = camera_tensors(data["data_samples"])
    voxels = data["inputs"].get("voxels")
    if isinstance(voxels, dict) and voxels.get("coors") is not None and voxels["coors"].shape[0] == 0:
        raise ExportError(f"no points of {label} fall inside the point-cloud range {point_cloud_range(cfg)}")
    data["inputs"] = map_tensors(data["inputs"], lambda t: t.to(device))
    return Sample(label, int(points.shape[0]), data)


# ---------------------------------------------------------------- monocular models: one camera image


def loads_2d_image(cfg) -> bool:
    """Is this a 2D image detector (mmdet's ``LoadImageFromFile``, no points: nuImages Mask R-CNN, ...)?"""
    types = {step.get("type") for step in _pipeline_cfg(cfg)}
    return "LoadImageFromFile" in types and "LoadPointsFromFile" not in types


def make_2d_image_sample(model, cfg, image: Path, mirrored: bool = False) -> Sample:
    """One image through the config's test pipeline and the data preprocessor, as
    ``mmdet.apis.inference_detector`` runs it; mmdet's detectors take the image batch itself,
    kept here as ``inputs["imgs"]`` (the wrapper's input path)."""
    label = f"{image} (mirrored)" if mirrored else str(image)
    with tempfile.TemporaryDirectory(prefix="mmdet3d-export-") as tmp:
        path = _mirrored(image, Path(tmp)) if mirrored else image
        packed = run_pipeline(cfg, {"img_path": str(path), "img_id": 0}, label, "image")
    data = preprocess(model, packed)
    device = next(model.parameters()).device
    data["inputs"] = {"imgs": data["inputs"].to(device)}
    return Sample(label, 0, data)


def _mirrored(image: Path, folder: Path) -> Path:
    """``image`` mirrored left-right, written into ``folder``: a second sample of the same size."""
    import mmcv

    pixels = mmcv.imread(str(image), flag="unchanged")
    if pixels is None:
        raise ExportError(f"cannot read camera image {image}")
    path = folder / "mirrored.png"
    mmcv.imwrite(np.ascontiguousarray(pixels[:, ::-1]), str(path))
    return path


def loads_mono_image(cfg) -> bool:
    """Does the test pipeline load one camera image (``LoadImageFromFileMono3D``: FCOS3D, PGD, SMOKE)?"""
    return any(step.get("type") == "LoadImageFromFileMono3D" for step in _pipeline_cfg(cfg))


def resolve_image(ref: str | None, cfg, log=print) -> Path:
    """The camera image behind a frame reference; monocular models have no synthetic input."""
    if ref is None:
        raise ExportError("a monocular model needs a real camera image (--frame IMAGE), not a synthetic cloud")
    path = Path(ref) if Path(ref).is_file() else data_root() / ref
    if not path.is_file():
        raise ExportError(f"camera image not found: {ref} (data root {data_root()})")
    if ref == FALLBACK_IMAGE and dataset_type(cfg) not in DEFAULT_IMAGES:
        log(f"warning: no {dataset_type(cfg)} camera image in the shared data; sampling on {ref}")
    return path


def image_item(image: Path) -> dict:
    """``images`` for ``LoadImageFromFileMono3D``: the entry naming this image in an info .pkl
    beside it (its cam2img), alone, as ``mmdet3d.apis.inference_mono_3d_detector`` passes it."""
    import mmengine

    for pkl in sorted(image.parent.glob("*.pkl")):
        try:
            infos = mmengine.load(str(pkl))
        except Exception:
            continue
        for info in (infos.get("data_list") if isinstance(infos, dict) else None) or []:
            for cam, entry in (info.get("images") or {}).items():
                if Path(entry.get("img_path") or "").name == image.name:
                    return {"images": {cam: dict(copy.deepcopy(entry), img_path=str(image))}}
    raise ExportError(f"no info .pkl beside {image} describes the image (its cam2img): mmdet3d's mono pipeline needs it")


def make_image_sample(model, cfg, image: Path, mirrored: bool = False) -> Sample:
    """One camera image (mirrored left-right if asked: a second sample of the same size)
    through the config's test pipeline and the data preprocessor."""
    from mmdet3d.structures import get_box_type

    item = image_item(image)
    box_type_3d, box_mode_3d = get_box_type(cfg.test_dataloader.dataset.get("box_type_3d", "Camera"))
    item.update(box_type_3d=box_type_3d, box_mode_3d=box_mode_3d)
    label = f"{image} (mirrored)" if mirrored else str(image)
    with tempfile.TemporaryDirectory(prefix="mmdet3d-export-") as tmp:
        if mirrored:
            next(iter(item["images"].values()))["img_path"] = str(_mirrored(image, Path(tmp)))
        packed = run_pipeline(cfg, item, label, "image")
    data = preprocess(model, packed)
    device = next(model.parameters()).device
    data["inputs"] = map_tensors(data["inputs"], lambda t: t.to(device))
    return Sample(label, 0, data)


def load_model(config: str, checkpoint: str | None = None, device: str = "cpu", log=print):
    """Config reference (path or shipped name) -> built model with optional weights."""
    from .configs import resolve_config

    model = build_model(load_config(resolve_config(config)), device)
    if checkpoint:
        load_weights(model, checkpoint, log)
    return model


def sample_frame(model, ref: str | None, variant: int = 0, log=print) -> Sample:
    """Sample ``ref`` (see resolve_frame); variant k keeps every (k+1)-th point (monocular
    models: variant k > 0 is the image mirrored left-right, same size, other content)."""
    if loads_mono_image(model.cfg):
        return make_image_sample(model, model.cfg, resolve_image(ref, model.cfg, log), mirrored=variant > 0)
    if loads_2d_image(model.cfg):
        return make_2d_image_sample(model, model.cfg, resolve_image(ref, model.cfg, log), mirrored=variant > 0)
    return make_sample(model, model.cfg, resolve_frame(ref, log), keep_every=1 + variant)


def map_tensors(tree: Any, fn) -> Any:
    """Apply ``fn`` to every tensor of a nested dict/list/tuple."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(v, fn) for v in tree)
    return tree


def clone_tree(tree: Any) -> Any:
    return map_tensors(tree, lambda t: t.clone())


def tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(tree, found.append)
    return found


def pick_device(requested: str, log=print) -> str:
    if requested.startswith("cuda") and not torch.cuda.is_available():
        log(f"warning: {requested} requested but CUDA is not available; falling back to cpu")
        return "cpu"
    return requested
