"""Progress over the 9 steps: one line per finished step by default, details with --verbose."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Iterator

from rich.console import Console

STEPS = {
    1: "load config",
    2: "build model",
    3: "load checkpoint",
    4: "sample via test pipeline",
    5: "analyse inputs",
    6: "run model once",
    7: "render wrapper",
    8: "export",
    9: "validate",
}


class Steps:
    def __init__(self, verbose: bool = False, console: Console | None = None) -> None:
        self.verbose = verbose
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.timings: dict[str, float] = {}
        if not verbose:
            # mmengine and friends are chatty; keep their warnings for --verbose
            for name in ("mmengine", "torch.onnx", "torch.export", "torch._export", "onnxscript"):
                logging.getLogger(name).setLevel(logging.ERROR)
            warnings.filterwarnings("ignore")

    @contextlib.contextmanager
    def step(self, number: int, note: str = "") -> Iterator[None]:
        title = STEPS[number] + (f" ({note})" if note else "")
        start = time.perf_counter()
        with self.console.status(f"[{number}/9] {title} ...", spinner="dots"):
            yield
        took = time.perf_counter() - start
        self.timings[STEPS[number]] = round(took, 3)
        self.console.print(f"[green]✓[/] [{number}/9] {title} [dim]{took:.1f} s[/]")

    def skip(self, number: int, why: str) -> None:
        self.console.print(f"[dim]- [{number}/9] {STEPS[number]}: {why}[/]")

    def detail(self, message: str) -> None:
        if self.verbose:
            self.console.print(f"      {message}", markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/]")

    def info(self, message: str) -> None:
        self.console.print(message, markup=False)
