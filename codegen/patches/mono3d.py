"""Validation help for the monocular heads (FCOS3D, PGD): box priors chosen by the top class.

With per-class priors (PGD's ``base_depths`` / ``base_dims``), ``FCOS3DBBoxCoder.decode`` picks
each pixel's depth and size prior by ``cls_score.max(dim=1)[1]``: where two class logits nearly
tie (PGD, nuScenes CAM_FRONT mirrored, random weights: 0.418457 and 0.418468 at one pixel),
a runtime whose floats differ in the last bits (IREE: 2.6e-5 there) takes the other class, and
that pixel's depth and sizes (``bbox_pred`` channels 2-5) come from another prior (48.2 -> 38.1).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from ..validate import within_tolerance


@contextlib.contextmanager
def forced_prior_classes(coder, classes: dict[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """Make ``coder.decode`` choose ``classes[(H, W)]`` (``[B, H, W]``) as each pixel's top class
    on the level of that size (its ``cls_score`` replaced by the one-hot of that choice)."""

    def decode(bbox, scale, stride, training, cls_score=None):
        forced = None if cls_score is None else classes.get(tuple(cls_score.shape[-2:]))
        if forced is not None:
            cls_score = torch.nn.functional.one_hot(forced, cls_score.shape[1]).permute(0, 3, 1, 2).to(cls_score)
        return original(bbox, scale, stride, training, cls_score)

    original, own = coder.decode, coder.__dict__.get("decode")
    coder.decode = decode
    try:
        yield
    finally:
        if own is None:
            del coder.decode  # the class's method again
        else:
            coder.decode = own


def reselect_prior_classes(wrapper, output_names: Sequence[str], args, outputs, reference, atol: float, rtol: float):
    """``validate``'s reselect for the mono3d recipe: when a runtime's top class differs from the
    reference's at some pixels (``cls_score_<level>``), and at each such pixel the reference's
    logit of the runtime's class equals its top logit within the tolerance (a tie), the patched
    eager model is re-run with the runtime's classes forced; else None (no class-dependent
    priors, same choices, or a real mismatch)."""
    coder = getattr(getattr(wrapper.model, "bbox_head", None), "bbox_coder", None)
    per_class = getattr(coder, "base_dims", None) is not None or len(getattr(coder, "base_depths", None) or ()) > 1
    names = list(output_names)
    levels = [n for n in names if n.startswith("cls_score_")]
    if not per_class or not levels:
        return None
    got, ref = dict(zip(names, outputs)), dict(zip(names, reference))
    classes, differs = {}, False
    for name in levels:
        scores, runtime_scores = np.asarray(ref[name]), np.asarray(got[name])
        choice = runtime_scores.argmax(1)
        moved = choice != scores.argmax(1)
        if moved.any():
            top = scores.max(1)
            taken = np.take_along_axis(scores, choice[:, None], 1)[:, 0]
            if not within_tolerance(taken, top, atol, rtol)[moved].all():
                return None
            differs = True
        classes[tuple(scores.shape[-2:])] = torch.from_numpy(choice)
    if not differs:
        return None
    with forced_prior_classes(coder, classes):
        return [o.detach().cpu().numpy() for o in wrapper(*args)]
