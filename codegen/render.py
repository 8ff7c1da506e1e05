"""Step 7: render the wrapper module from templates/, format it with black, check it parses."""

from __future__ import annotations

import ast
import difflib
import os
import tempfile
from pathlib import Path
from typing import Any

import black
import jinja2

from . import __version__
from .analyze import Analysis
from .errors import ExportError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
LINE_LENGTH = 100


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["pyrepr"] = _pyrepr
    env.filters["shape"] = _shape
    env.filters["append"] = lambda text, suffix: f"{text}{suffix}"
    return env


def _pyrepr(value: Any) -> str:
    """repr() with sorted dicts and tuples for sequences: stable across runs."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_pyrepr(k)}: {_pyrepr(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_pyrepr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def input_tree(analysis: Analysis, root: str = "inputs") -> Any:
    """The nested model input (below ``root``) with flat names at the leaves."""
    tree: dict = {}
    for t in analysis.used_inputs:
        parts = t.path.split(".")
        if parts[0] != root:
            raise ExportError(f"wrapper inputs must live under {root!r}, got {t.path}")
        node = tree
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = t.name
    return _lists(tree)


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 (pytree lists) back to lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node) and sorted(map(int, node)) == list(range(len(node))):
        return [node[str(i)] for i in range(len(node))]
    return node


def render_wrapper(
    *,
    analysis: Analysis,
    recipe,
    config_ref: str,
    config_sha256: str,
    model_type: str,
    frame: str | None,
    command: str,
    outputs: str = "head",
) -> str:
    context = dict(
        version=__version__,
        config_ref=config_ref,
        config_sha256=config_sha256,
        config_stem=Path(config_ref.split("::")[-1]).stem,
        model_type=model_type,
        recipe=recipe.name,
        patch_names=list(recipe.patches),
        call=recipe.call,
        outputs_mode=outputs,
        boxes_call=recipe.boxes if outputs == "boxes" else None,
        frame=frame,
        command=command,
        batch_size=analysis.batch_size,
        inputs=analysis.used_inputs,
        outputs=analysis.outputs,
        input_tree=input_tree(analysis),
        dynamic_dims=analysis.dynamic_dims(),
        min_dim=recipe.min_dim,
    )
    source = environment().get_template("wrapper.py.jinja").render(**context)
    try:
        source = black.format_str(source, mode=black.Mode(line_length=LINE_LENGTH))
        ast.parse(source)
    except Exception as exc:  # a template bug: say where
        raise ExportError(f"rendered wrapper does not parse: {exc}") from None
    return source


def diff(old: str, new: str, path: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (committed)", f"{path} (regenerated)"))


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text``; leave the file (and its mtime) alone when unchanged."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
