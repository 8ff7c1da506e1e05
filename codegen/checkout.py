"""Configs from a user's mmdetection3d source checkout (``projects/``, e.g. BEVFusion).

The mmdet3d wheel ships ``mmdet3d/.mim/configs`` but not the repository's ``projects/`` folder;
a project config says ``custom_imports = dict(imports=['projects.BEVFusion.bevfusion'])`` and
expects the checkout root on ``sys.path``. ``--source-root PATH`` names that root; without it the
root is the checkout that holds the config file, else ``$MMDET3D_EXPORT_SOURCE_ROOT``, else
``../shared/third_party/mmdetection3d`` beside this repository (where committed wrappers find it).

A config inside the checkout is recorded by its path relative to the root
(``projects/BEVFusion/configs/<name>.py``), so a wrapper does not depend on where the checkout is.

**Stand-ins for uncompiled ops.** A checkout's CUDA/C++ extensions (BEVFusion's ``bev_pool_ext``
and ``voxel_layer``) only exist once someone builds them; without them the project does not even
import. ``activate()`` appends a finder to ``sys.meta_path`` that provides those modules from
``codegen.ops`` (same call signatures, results equal to the compiled kernels) *only when the real
ones are not importable*: a compiled build still wins. The source tree is never written to.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

from .errors import ExportError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = "MMDET3D_EXPORT_SOURCE_ROOT"

_active: Path | None = None


def default_root() -> Path:
    """$MMDET3D_EXPORT_SOURCE_ROOT or ../shared/third_party/mmdetection3d beside the repo."""
    return Path(os.environ.get(ENV, REPO_ROOT.parent / "shared" / "third_party" / "mmdetection3d"))


def active_root() -> Path | None:
    return _active


def _check_root(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise ExportError(f"{flag} {path}: no such folder")
    if not (path / "projects").is_dir():
        raise ExportError(f"{flag} {path} is not an mmdetection3d checkout: it has no projects/ folder")
    return path.resolve()


def activate(path: str | os.PathLike, flag: str = "--source-root") -> Path:
    """Use ``path`` as the checkout: on ``sys.path`` (first) and stand-ins for uncompiled ops."""
    global _active
    root = _check_root(Path(path).expanduser(), flag)
    if _active is not None and _active != root:
        raise ExportError(f"{flag} {root}: another checkout ({_active}) is already in use in this process")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if not any(isinstance(f, StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(StandInFinder())
    _active = root
    return root


def _holding_checkout(config: Path) -> Path | None:
    """The checkout root whose ``projects/`` folder holds ``config``, if any."""
    for parent in config.resolve().parents:
        if parent.name == "projects" and parent.parent != parent:
            return parent.parent
    return None


def find_config(spec: str) -> tuple[Path, str] | None:
    """``(file, machine-independent ref)`` for a config in a checkout, else None.

    ``spec`` is a file inside a checkout (ref: its path below the root), or a path relative to
    the active or default root (``projects/BEVFusion/configs/x.py``)."""
    path = Path(spec).expanduser()
    if path.is_file():
        root = _active or _holding_checkout(path)
        if root is None:
            return None
        try:
            return path.resolve(), path.resolve().relative_to(root).as_posix()
        except ValueError:
            return None
    if path.is_absolute() or not path.parts or path.parts[0] != "projects":
        return None
    root = _active or default_root()
    if (root / path).is_file():
        return (root / path).resolve(), path.as_posix()
    where = f"--source-root {_active}" if _active else f"the default checkout {root} (set --source-root)"
    raise ExportError(f"config {spec} not found in {where}")


def is_missing(spec: str) -> bool:
    """Is ``spec`` a checkout-relative config (``projects/...``) with no checkout holding it?
    (``generate --check`` skips such committed wrappers on a machine without the checkout.)"""
    path = Path(spec)
    if path.is_absolute() or not path.parts or path.parts[0] != "projects":
        return False
    return not ((_active or default_root()) / path).is_file()


def import_custom_modules(cfg, config_path: Path) -> None:
    """Import the config's ``custom_imports`` (what mmengine would do), with one clear error.

    A ``projects.*`` import activates the checkout first: the explicit one, else the one holding
    the config, else the default root."""
    custom = cfg.get("custom_imports") or {}
    imports = custom.get("imports") or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    if not imports:
        return
    if any(name.split(".")[0] == "projects" for name in imports) and _active is None:
        root = _holding_checkout(config_path) or default_root()
        if not (root / "projects").is_dir():
            raise ExportError(
                f"config {config_path.name} imports {imports[0]} from an mmdetection3d source checkout: "
                "pass --source-root <checkout> (the folder holding projects/)"
            )
        activate(root, "source root" if root != default_root() else f"${ENV} / default source root")
    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if custom.get("allow_failed_imports"):
                continue
            where = f" under {_active}" if _active else ""
            raise ExportError(f"config {config_path.name}: cannot import {name}{where}: {exc}") from None


# ------------------------------------------------------------------------ uncompiled-op stand-ins


def _bevfusion_hard_voxelize(
    points, voxels, coors, num_points_per_voxel, voxel_size, coors_range, max_points, max_voxels, NDim=3, deterministic=True
) -> int:
    """BEVFusion ``voxel_layer.hard_voxelize``: fills the caller's buffers, returns the voxel count.
    Its kernel is mmcv's with coordinates in ``(x, y, z)`` order (mmcv's are ``(z, y, x)``)."""
    from .ops.voxelize import hard_voxelize_padded

    v, c, n, m = hard_voxelize_padded(points, voxel_size, coors_range, max_points, max_voxels)
    voxels.copy_(v)
    coors.copy_(c.flip(1))
    num_points_per_voxel.copy_(n)
    return int(m)


def _bevfusion_dynamic_voxelize(points, coors, voxel_size, coors_range, NDim=3) -> None:
    """BEVFusion ``voxel_layer.dynamic_voxelize``: per-point ``(x, y, z)``, -1 rows out of range."""
    from .ops.voxelize import dynamic_voxelize

    coors.copy_(dynamic_voxelize(points, voxel_size, coors_range).flip(1))


def _not_built(name: str):
    def missing(*args, **kwargs):
        raise ExportError(f"{name} is a compiled op of the checkout that is not built here and has no stand-in")

    return missing


def _bev_pool_forward(x, geom_feats, interval_lengths, interval_starts, B, D, H, W):
    """BEVFusion ``bev_pool_ext.bev_pool_forward``: the caller sorted the rows by cell; each
    interval's rows are summed in order (float32, from 0) into ``out[b, z, x, y]``,
    ``[B, D, H, W, C]``. Every row of ``x`` lies in one interval, so this is ``bev_pool`` on the
    rows in their given order (codegen.ops.bev_pool sums in input order)."""
    from .ops.bev_pool import bev_pool

    # ops.bev_pool returns [B, C, D, H, W]; the kernel's layout is [B, D, H, W, C]
    return bev_pool(x, geom_feats, B, D, H, W).permute(0, 2, 3, 4, 1).contiguous()


STAND_INS = {
    "projects.BEVFusion.bevfusion.ops.voxel.voxel_layer": {
        "hard_voxelize": _bevfusion_hard_voxelize,
        "dynamic_voxelize": _bevfusion_dynamic_voxelize,
        "dynamic_point_to_voxel_forward": _not_built("voxel_layer.dynamic_point_to_voxel_forward"),
        "dynamic_point_to_voxel_backward": _not_built("voxel_layer.dynamic_point_to_voxel_backward"),
    },
    "projects.BEVFusion.bevfusion.ops.bev_pool.bev_pool_ext": {
        "bev_pool_forward": _bev_pool_forward,
        "bev_pool_backward": _not_built("bev_pool_ext.bev_pool_backward"),
    },
}


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: reached only when no compiled module of that name exists."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in STAND_INS:
            return importlib.machinery.ModuleSpec(fullname, self, origin="codegen.checkout stand-in")
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "pure-torch stand-in (codegen.checkout) for an uncompiled extension"
        for name, fn in STAND_INS[module.__name__].items():
            setattr(module, name, fn)


def is_stand_in(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    return module is not None and isinstance(getattr(module, "__spec__", None) and module.__spec__.loader, StandInFinder)


