"""Model patchers: swap export-unfriendly mmdet3d/mmcv code for ``codegen.ops`` while active.

A patch names a class attribute (``"mmdet3d.models.detectors.voxelnet:VoxelNet.extract_feat"``)
and the function that replaces it. Recipes list patches by name; ``applied(names)`` installs
them for the duration of a ``with`` block and always restores the originals, so the installed
packages are never edited and the original code stays available for comparison.

Some patched code needs facts that are data-dependent in the original (the batch size is
``coors[-1, 0].item() + 1`` in mmdet3d); the wrapper fixes them as constants and hands them in
through ``applied(..., batch_size=1)``; ``static_batch_size()`` reads them inside patched code.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

_BATCH_SIZE: contextvars.ContextVar[int | None] = contextvars.ContextVar("batch_size", default=None)


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # "package.module:Class.attribute"
    replacement: Callable
    why: str

    def resolve(self) -> tuple[object, str]:
        module_name, qual = self.target.split(":")
        owner: object = importlib.import_module(module_name)
        *path, attr = qual.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, attr


REGISTRY: dict[str, Patch] = {}
_INHERITED = object()  # marks a patched attribute that the class itself did not define


def register(name: str, target: str, why: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the replacement of ``target`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"patch {name!r} registered twice")
        REGISTRY[name] = Patch(name, target, fn, why)
        return fn

    return deco


def known_batch_size() -> int | None:
    """The static batch size of the ``applied`` block, or None outside one."""
    return _BATCH_SIZE.get()


def static_batch_size() -> int:
    value = _BATCH_SIZE.get()
    if value is None:
        raise RuntimeError("patched code needs a static batch size: use patches.applied(..., batch_size=N)")
    return value


@contextlib.contextmanager
def applied(names: tuple[str, ...] | list[str], batch_size: int | None = None) -> Iterator[None]:
    """Install the named patches (and static facts) for the duration of the block."""
    _load_all()
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown patches: {unknown}; known: {sorted(REGISTRY)}")
    saved: list[tuple[object, str, object]] = []
    token = _BATCH_SIZE.set(batch_size)
    try:
        for name in names:
            owner, attr = REGISTRY[name].resolve()
            # an inherited method (not in the class's own __dict__) is shadowed, then removed again
            saved.append((owner, attr, owner.__dict__.get(attr, _INHERITED)))
            setattr(owner, attr, REGISTRY[name].replacement)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if original is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        _BATCH_SIZE.reset(token)


def _load_all() -> None:
    """Import the modules that register patches (kept lazy: they import mmdet3d)."""
    from . import bevfusion, deform_conv, dynamic_voxel, points, pv_rcnn, sparse, voxelnet  # noqa: F401
