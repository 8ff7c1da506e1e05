"""Config resolution: a file path, a config shipped inside mmdet3d, or a 0.x-era name.

Accepted forms of ``--config``:
  * a path to a config file;
  * a shipped config name, ``pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car`` (``.py`` optional),
    or a metafile alias (``pointpillars_kitti-3class``);
  * ``mmdet3d::pointpillars/<file>.py``;
  * a config of an mmdetection3d source checkout (``projects/BEVFusion/configs/<file>.py``, a path
    or relative to ``--source-root``; see ``codegen.checkout``);
  * a 0.x-era name or path (``configs/pointpillars/hv_pointpillars_secfpn_6x8_160e_kitti-3d-car.py``),
    mapped to its 1.x file through the wheel's ``metafile.yml`` files, whose weights URLs carry
    the old names.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError

MIM_PREFIX = "mmdet3d::"


@dataclass(frozen=True)
class ResolvedConfig:
    path: Path  # the file on disk
    ref: str  # a machine-independent name: "mmdet3d::dir/file.py" or the path as given
    note: str | None = None  # e.g. "legacy name mapped to ..."

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def stem(self) -> str:
        return self.path.stem


def shipped_config_root() -> Path:
    import mmdet3d

    return Path(mmdet3d.__file__).parent / ".mim" / "configs"


def _strip(name: str) -> str:
    name = name.rsplit("/", 1)[-1]
    return name[:-3] if name.endswith(".py") else name


@functools.lru_cache(maxsize=1)
def _shipped_index() -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """(name -> file, alias -> file, legacy name -> file), all derived from the wheel."""
    import yaml

    root = shipped_config_root()
    by_name = {p.stem: p for p in sorted(root.glob("*/*.py"))}
    aliases: dict[str, Path] = {}
    legacy: dict[str, Path] = {}
    for meta in sorted(root.glob("*/metafile.yml")):
        doc = yaml.safe_load(meta.read_text()) or {}
        for model in doc.get("Models") or []:
            cfg = model.get("Config")
            if not cfg:
                continue
            target = by_name.get(_strip(cfg))
            if target is None:
                continue
            if model.get("Alias"):
                aliases[str(model["Alias"])] = target
            url = model.get("Weights") or ""
            parts = url.rstrip("/").split("/")
            if len(parts) >= 2 and parts[-1].endswith(".pth"):
                legacy.setdefault(parts[-2], target)
    return by_name, aliases, legacy


def _shipped_ref(path: Path) -> str:
    rel = path.relative_to(shipped_config_root())
    return MIM_PREFIX + rel.as_posix()


def resolve_config(spec: str) -> ResolvedConfig:
    """Turn whatever the user wrote into a config file, or raise ExportError."""
    if not spec:
        raise ExportError("--config is empty")
    from .checkout import find_config

    in_checkout = find_config(spec)  # projects/... of a source checkout: ref relative to its root
    if in_checkout is not None:
        return ResolvedConfig(*in_checkout)
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedConfig(path.resolve(), spec)
    if spec.startswith(MIM_PREFIX):
        target = shipped_config_root() / spec[len(MIM_PREFIX) :]
        if target.is_file():
            return ResolvedConfig(target, spec)
        raise ExportError(f"config {spec!r} is not shipped with mmdet3d ({target} does not exist)")
    by_name, aliases, legacy = _shipped_index()
    name = _strip(spec)
    if name in by_name:
        return ResolvedConfig(by_name[name], _shipped_ref(by_name[name]))
    if name in aliases:
        target = aliases[name]
        return ResolvedConfig(target, _shipped_ref(target), f"alias {name!r} is config {target.stem!r}")
    if name in legacy:
        target = legacy[name]
        return ResolvedConfig(
            target,
            _shipped_ref(target),
            f"0.x config name {name!r} mapped to its mmdet3d 1.x config {target.stem!r}",
        )
    if spec.endswith(".py") or "/" in spec:
        raise ExportError(f"config file not found: {spec} (not a file, nor a config shipped with mmdet3d)")
    raise ExportError(f"unknown config name {spec!r}: not a file and not a config shipped with mmdet3d")


def shipped_config_names() -> list[str]:
    return sorted(_shipped_index()[0])
