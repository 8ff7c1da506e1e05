"""Patches for point-set models (VoteNet, PointNet++ family): mmcv's CUDA-only point ops -> codegen.ops.points.

mmcv 2.1.0 has no CPU kernel for furthest point sampling, ball query, grouping, gathering,
three-NN interpolation or points_in_boxes part/all (used by VoteHead's NMS), nor for the stacked
ball query / grouping (clouds concatenated with batch counts) of PV-RCNN, so these models cannot
even run eagerly on a CPU. The callers import the
functions by name, so the patches replace those names in the modules that use them.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Iterator, Sequence

import numpy as np
import torch

from ..boxes import topk_ordered
from ..ops import points as ops
from ..ops import roi
from ..validate import within_tolerance
from . import register

_WHY = "CUDA-only mmcv op; pure-torch equivalent (tests/ops/test_points.py)"

register("points.fps", "mmcv.ops.points_sampler:furthest_point_sample", _WHY)(ops.furthest_point_sample)
register("points.fps_with_dist", "mmcv.ops.points_sampler:furthest_point_sample_with_dist", _WHY)(
    ops.furthest_point_sample_with_dist
)
register("points.vote_head_fps", "mmdet3d.models.dense_heads.vote_head:furthest_point_sample", _WHY)(
    ops.furthest_point_sample
)
register("points.gather", "mmdet3d.models.layers.pointnet_modules.point_sa_module:gather_points", _WHY)(
    ops.gather_points
)
register("points.groupfree_gather", "mmdet3d.models.dense_heads.groupfree3d_head:gather_points", _WHY)(
    ops.gather_points
)
register("points.three_nn", "mmdet3d.models.layers.pointnet_modules.point_fp_module:three_nn", _WHY)(ops.three_nn)
register("points.three_interpolate", "mmdet3d.models.layers.pointnet_modules.point_fp_module:three_interpolate", _WHY)(
    ops.three_interpolate
)
register("points.in_boxes_all", "mmdet3d.structures.bbox_3d.base_box3d:points_in_boxes_all", _WHY)(
    roi.points_in_boxes_all
)
register("points.in_boxes_part", "mmdet3d.structures.bbox_3d.base_box3d:points_in_boxes_part", _WHY)(
    roi.points_in_boxes_part
)


class _RoIAwarePool3dFunction:
    """mmcv's ``RoIAwarePool3dFunction`` (CUDA-only), as ``RoIAwarePool3d.forward`` calls it:
    ``apply(rois, pts, pts_feature, out_size, max_pts_per_voxel, mode)``, mode 0 max, 1 avg
    (tests/ops/test_roi.py)."""

    @staticmethod
    def apply(rois, pts, pts_feature, out_size, max_pts_per_voxel, mode):
        return roi.roiaware_pool3d(rois, pts, pts_feature, out_size, max_pts_per_voxel, ("max", "avg")[mode])


register("points.roiaware_pool3d", "mmcv.ops.roiaware_pool3d:RoIAwarePool3dFunction", _WHY)(_RoIAwarePool3dFunction)


@register("points.ball_query", "mmcv.ops.group_points:ball_query", _WHY)
def ball_query(min_radius, max_radius, sample_num, xyz, center_xyz, xyz_batch_cnt=None, center_xyz_batch_cnt=None):
    """mmcv's ``ball_query``: batched ``[B, N, 3]``, or stacked ``[N1 + N2 ..., 3]`` with counts."""
    if xyz_batch_cnt is not None and center_xyz_batch_cnt is not None:
        return ops.stack_ball_query(max_radius, sample_num, xyz, xyz_batch_cnt, center_xyz, center_xyz_batch_cnt)
    return ops.ball_query(min_radius, max_radius, sample_num, xyz, center_xyz)


@register("points.grouping", "mmcv.ops.group_points:grouping_operation", _WHY)
def grouping_operation(features, indices, features_batch_cnt=None, indices_batch_cnt=None):
    """mmcv's ``grouping_operation``: batched ``[B, C, N]``, or stacked ``[N1 + N2 ..., C]`` with counts."""
    if features_batch_cnt is not None and indices_batch_cnt is not None:
        return ops.stack_grouping_operation(features, features_batch_cnt, indices, indices_batch_cnt)
    return ops.grouping_operation(features, indices)


def stable_topk(input, k, dim=-1, largest=True, sorted=True):
    """``torch.topk`` over the last axis, largest first, ties -> lower index first (ONNX TopK's
    rule): ``codegen.boxes.topk_ordered``.  ``torch.topk`` leaves the order of ties open, and
    Group-Free 3D's ``kps`` sampling takes the top 256 of 1024 sigmoid scores where, with random
    weights, ~1000 are exactly 0.5: eager and onnxruntime sampled different seeds."""
    if dim not in (-1, input.dim() - 1) or not largest:
        raise NotImplementedError("stable_topk: last axis, largest only")
    forced = _FORCED_TOPK.get()
    if forced is not None:  # reselect_topk: the reference re-run with a runtime's choice
        index = forced.to(input.device)
        return torch.gather(input, -1, index), index
    return topk_ordered(input, k)


_FORCED_TOPK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("forced_topk", default=None)


@contextlib.contextmanager
def forced_topk(index: torch.Tensor) -> Iterator[None]:
    """Make ``stable_topk`` return ``index`` (``[B, k]``)."""
    token = _FORCED_TOPK.set(index)
    try:
        yield
    finally:
        _FORCED_TOPK.reset(token)


def reselect_topk(wrapper, output_names: Sequence[str], args, outputs, reference, atol: float, rtol: float):
    """``validate``'s reselect for Group-Free 3D's ``kps`` sampling: the top 256 of 1024 seed
    scores (sigmoid of the logits), where gaps between logits (~1e-5) are as small as
    onnxruntime's float error (2e-5) and large logits saturate to tied scores of 1.0: a runtime
    may order near-equal seeds differently, which permutes every per-proposal output.
    When its ``query_points_sample_inds`` differ but are a valid top-k (the eager scores of its
    choice equal the eager top-k's, sorted, within tolerance), the patched eager model is re-run
    with that choice forced; else None (models without kps sampling, or a real mismatch).
    (Comparing logits instead failed Group-Free L6-O256 on ScanNet at commit a07438f, which the
    sixth session's sweep passed; comparing the scores, it passes.)"""
    names = list(output_names)
    if "query_points_sample_inds" not in names or "seeds_obj_cls_logits" not in names:
        return None
    got, ref = dict(zip(names, outputs)), dict(zip(names, reference))
    index, ref_index = np.asarray(got["query_points_sample_inds"]), np.asarray(ref["query_points_sample_inds"])
    if np.array_equal(index, ref_index):
        return None
    # the scores the top-k ranks: sigmoid saturates (exactly 1.0 in float32 from logits of ~17 on),
    # so seeds whose logits differ by more than the tolerance can tie, and a runtime whose sigmoid
    # rounds one of them below 1.0 takes another seed of the tie
    scores = torch.sigmoid(torch.from_numpy(np.asarray(ref["seeds_obj_cls_logits"])[:, 0])).double().numpy()
    chosen = np.sort(np.take_along_axis(scores, index, 1), axis=1)
    best = np.sort(np.take_along_axis(scores, ref_index, 1), axis=1)
    if not within_tolerance(chosen, best, atol, rtol).all():
        return None
    with forced_topk(torch.from_numpy(index.astype(np.int64))):
        return [o.detach().cpu().numpy() for o in wrapper(*args)]


class _TorchWithStableTopk(types.ModuleType):
    """``torch`` as a module global of one mmdet3d module, with ``topk`` = ``stable_topk``."""

    topk = staticmethod(stable_topk)

    def __getattr__(self, name):
        return getattr(torch, name)


register(
    "points.groupfree_stable_topk",
    "mmdet3d.models.dense_heads.groupfree3d_head:torch",
    "torch.topk leaves the order of tied scores open (kps sampling); ONNX TopK's tie rule",
)(_TorchWithStableTopk("torch"))

# PV-RCNN's modules bind the same functions under their own names
_STACK = "mmdet3d.models.layers.pointnet_modules.stack_point_sa_module"
register("points.stack_ball_query", f"{_STACK}:ball_query", _WHY)(ball_query)
register("points.stack_grouping", f"{_STACK}:grouping_operation", _WHY)(grouping_operation)
register("points.vsa_fps", "mmdet3d.models.middle_encoders.voxel_set_abstraction:furthest_point_sample", _WHY)(
    ops.furthest_point_sample
)


# what a PointNet++ backbone and a vote head's tensor path need
POINT_OP_PATCHES = (
    "points.fps",
    "points.fps_with_dist",
    "points.vote_head_fps",
    "points.gather",
    "points.groupfree_gather",
    "points.groupfree_stable_topk",
    "points.ball_query",
    "points.grouping",
    "points.three_nn",
    "points.three_interpolate",
)
# plus what predict's box post-processing needs
POINT_PATCHES = POINT_OP_PATCHES + ("points.in_boxes_all", "points.in_boxes_part")
# what PV-RCNN's VoxelSetAbstraction and RoI-grid pooling need (stacked clouds with batch counts)
STACKED_POINT_PATCHES = ("points.vsa_fps", "points.stack_ball_query", "points.stack_grouping")
