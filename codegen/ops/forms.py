"""Which op forms an export traces: onnxruntime's (the default) or IREE's.

``codegen.export`` exports a wrapper once per runtime family: PT2 and ``model.onnx`` in the forms
onnxruntime runs fastest, ``model.iree.onnx`` (compiled into ``model.vmfb``) inside
``iree_forms()`` (entered by ``codegen.ops.points.export_forms``), in forms IREE 3.13 compiles
and runs well (docs/iree.md):

- ``ops.sort``: integer-key sorts as radix sorts (IREE's TopK sort is an O(n^2) loop), a top-k
  over rows longer than ``TOPK_ROW`` keys as a selection, then one TopK over k keys, the k-th
  largest float of such a row by a bit search (``kth_largest``);
- ``ops.nms``: the ``pre_max_size`` cut (``top_k_indices``) without TopK;
- ``ops.voxelize``: the voxel ids radix-sorted;
- ``ops.dynamic_scatter``: voxel keys on the grid, radix-sorted;
- ``ops.sparse_conv``: rulebook gathers kept out of IREE's data-tiling packs, the rulebook's
  pair keys sorted instead of packed into one int64;
- ``ops.points``: sequential loops unrolled and fixed-size ball queries (its own switches), the
  queries' first hits found by counting hits in chunks of columns (no TopK, no scatter),
  one-channel gathers padded to two.

Eager runs never change: ``iree_exporting()`` is true only while torch.export traces inside
``iree_forms()``.  Both forms give the same values (tests/ops check each against its reference).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Set by ``iree_forms()``.
IREE = False


@contextlib.contextmanager
def iree_forms(enabled: bool = True) -> Iterator[None]:
    """Within the block, exports take the IREE forms of the op library."""
    global IREE
    saved = IREE
    IREE = enabled
    try:
        yield
    finally:
        IREE = saved


def iree_exporting() -> bool:
    """Whether the op being traced takes its IREE form (exporting inside ``iree_forms()``)."""
    return IREE and torch.compiler.is_exporting()
