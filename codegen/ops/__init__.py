"""Export-friendly pure-torch replacements of mmcv / spconv ops (one module per op family)."""

from __future__ import annotations


def size_hint(n) -> int | None:
    """``n`` itself when static, else the export sample's value of the dynamic size (None when the
    graph computes it, e.g. PV-RCNN's sparse-conv voxel centres or a strided sparse conv's sites)."""
    hint = n if isinstance(n, int) else getattr(getattr(n, "node", None), "hint", None)
    return hint if isinstance(hint, int) and hint > 0 else None
