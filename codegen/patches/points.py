"""Patches for point-set models (VoteNet, PointNet++ family): mmcv's CUDA-only point ops -> codegen.ops.points.

mmcv 2.1.0 has no CPU kernel for furthest point sampling, ball query, grouping, gathering,
three-NN interpolation or points_in_boxes part/all (used by VoteHead's NMS), nor for the stacked
ball query / grouping (clouds concatenated with batch counts) of PV-RCNN, so these models cannot
even run eagerly on a CPU. The callers import the
functions by name, so the patches replace those names in the modules that use them.
"""

from __future__ import annotations

from ..ops import points as ops
from ..ops import roi
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
    "points.ball_query",
    "points.grouping",
    "points.three_nn",
    "points.three_interpolate",
)
# plus what predict's box post-processing needs
POINT_PATCHES = POINT_OP_PATCHES + ("points.in_boxes_all", "points.in_boxes_part")
# what PV-RCNN's VoxelSetAbstraction and RoI-grid pooling need (stacked clouds with batch counts)
STACKED_POINT_PATCHES = ("points.vsa_fps", "points.stack_ball_query", "points.stack_grouping")
