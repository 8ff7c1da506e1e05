"""Patches for PV-RCNN (``PointVoxelRCNN``): a fixed-size two-stage tensor path for export.

What stops the original from exporting (the CUDA-only point ops are ``patches.points``):

* ``extract_feat`` reads the batch size with ``coors[-1, 0].item() + 1``;
* the proposals (``PartA2RPNHead.predict_by_feat``) have a data-dependent count (score
  threshold, NMS) and come back as ``InstanceData`` with box objects;
* ``VoxelSetAbstraction.sample_key_points`` branches on ``num_points < num_keypoints``, and its
  ``forward`` turns the cloud sizes into Python ints (``len(p)``: graph constants) and writes
  the per-cloud counts in place;
* ``StackQueryAndGroup`` zeroes empty balls with boolean-mask writes (``idx[mask] = 0``);
* ``Batch3DRoIGridExtractor`` reads the batch size with ``int(batch_inds.max())`` and builds its
  grid with ``nonzero()``;
* the anchor generator's ``linspace`` with 0-d tensor ends does not convert to valid ONNX.

``pv_rcnn.fixed_proposals`` gives ``PointVoxelRCNN`` a ``_forward`` (the detector has none of its
own: ``TwoStage3DDetector._forward`` needs data samples and returns the variable-size proposals)
that runs the whole two-stage network with ``K = test_cfg.rpn.nms_post`` proposals
(``codegen.boxes.parta2_proposals``: fixed-K NMS, padding rows zero) and returns the RPN head
tensors, the proposals and the RoI head's outputs for every proposal slot.  Each of its steps is
the original's code (``extract_feat``, ``points_encoder``, the RoI head's semantic head,
``_bbox_forward``), under the other patches here; only the proposal step is replaced.
``tests/test_pv_rcnn.py`` checks every step against the original on the KITTI frame.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import boxes
from ..ops.points import furthest_point_sample
from . import register, static_batch_size


@register(
    "pv_rcnn.static_batch_size",
    "mmdet3d.models.detectors.pv_rcnn:PointVoxelRCNN.extract_feat",
    "batch size is coors[-1, 0].item() + 1: data-dependent, breaks torch.export",
)
def extract_feat(self, batch_inputs_dict: dict) -> dict:
    voxel_dict = batch_inputs_dict["voxels"]
    voxel_features = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
    spatial_feats, multi_scale_3d_feats = self.middle_encoder(voxel_features, voxel_dict["coors"], static_batch_size())
    feats_dict = {"spatial_feats": spatial_feats, "multi_scale_3d_feats": multi_scale_3d_feats}
    x = self.backbone(spatial_feats)
    if self.with_neck:
        feats_dict["neck_feats"] = self.neck(x)
    return feats_dict


@register(
    "pv_rcnn.fixed_proposals",
    "mmdet3d.models.detectors.pv_rcnn:PointVoxelRCNN._forward",
    "the proposals have a data-dependent count; fixed K = nms_post through fixed-K NMS",
)
def forward_fixed_proposals(self, batch_inputs_dict: dict, batch_data_samples=None) -> dict:
    """Both stages for one sample with ``K`` proposal slots; a dict of named tensors:

    ``cls_score``, ``bbox_pred``, ``dir_cls_pred``: the RPN head (``Anchor3DHead.forward``);
    ``rois [K, 7]``, ``roi_scores [K]``, ``roi_labels [K]``, ``num_rois``: the proposals;
    ``roi_cls_score [K, 1]``, ``roi_bbox_pred [K, 7]``: the RoI head (``PVRCNNBBoxHead``) for each
    slot (rows past ``num_rois`` come from all-zero padding boxes and mean nothing)."""
    feats_dict = self.extract_feat(batch_inputs_dict)
    cls_scores, bbox_preds, dir_cls_preds = self.rpn_head(feats_dict["neck_feats"])
    rois, roi_scores, roi_labels, num_rois = boxes.parta2_proposals(
        self.rpn_head, cls_scores, bbox_preds, dir_cls_preds, self.rpn_head.test_cfg
    )
    points_feats = self.points_encoder(batch_inputs_dict, feats_dict, None)  # the proposals are not read
    roi_head = self.roi_head
    seg_preds = roi_head.semantic_head(points_feats["keypoint_features"])["seg_preds"]
    point_features = points_feats["fusion_keypoint_features"] * seg_preds.sigmoid().max(dim=-1, keepdim=True).values
    batched_rois = torch.cat([rois.new_zeros(rois.shape[0], 1), rois], dim=1)  # bbox3d2roi for sample 0
    bbox_results = roi_head._bbox_forward(point_features, points_feats["keypoints"], batched_rois)
    return {
        "cls_score": cls_scores[0],
        "bbox_pred": bbox_preds[0],
        "dir_cls_pred": dir_cls_preds[0],
        "rois": rois,
        "roi_scores": roi_scores,
        "roi_labels": roi_labels,
        "num_rois": num_rois,
        "roi_cls_score": bbox_results["bbox_scores"],
        "roi_bbox_pred": bbox_results["bbox_reg"],
    }


@register(
    "vsa.key_points",
    "mmdet3d.models.middle_encoders.voxel_set_abstraction:VoxelSetAbstraction.sample_key_points",
    "branches on num_points < num_keypoints (a dynamic size); CUDA-only FPS",
)
def sample_key_points(self, points: list[Tensor], coors: Tensor | None) -> Tensor:
    """The original's key points without the branch: when a cloud has fewer points than
    ``num_keypoints`` it repeats the FPS picks cyclically (``idx[:n].repeat(times)[:num]``), which
    is ``idx[j mod n]`` for every slot ``j`` and the identity when ``n >= num_keypoints``; ``j mod
    n`` in float32 (exact below 2**24, no integer division)."""
    if self.voxel_center_as_source:
        raise NotImplementedError("voxel_center_as_source=True is not supported by the export patch")
    keypoints = []
    for cloud in points:
        xyz = cloud[:, :3]
        idx = furthest_point_sample(xyz.unsqueeze(0).contiguous(), self.num_keypoints)[0].to(torch.int64)
        slot = torch.arange(self.num_keypoints, device=xyz.device, dtype=torch.float32)
        n = torch.ones_like(xyz[:, 0]).sum()  # the point count as float32
        cyclic = (slot - torch.floor(slot / n) * n).to(torch.int64)
        keypoints.append(xyz.index_select(0, idx.index_select(0, cyclic)))
    return torch.stack(keypoints, dim=0)


def _count(rows: Tensor) -> Tensor:
    """``rows.shape[0]`` as an int32 tensor ``[1]`` computed from the data (a Python int would
    become a constant of the exported graph)."""
    return torch.ones_like(rows[:, 0], dtype=torch.int32).sum().view(1).int()


@register(
    "vsa.static",
    "mmdet3d.models.middle_encoders.voxel_set_abstraction:VoxelSetAbstraction.forward",
    "per-cloud counts from Python len() (constants in the graph), in-place count writes, integer //",
)
def vsa_forward(self, batch_inputs_dict: dict, feats_dict: dict, rpn_results_list=None) -> dict:
    """``VoxelSetAbstraction.forward`` with the counts of each cloud as tensors (``_count``,
    comparisons with the batch index), the keypoints' batch column from ``expand`` instead of
    ``arange // num_keypoints``; the same layers in the same order."""
    points = batch_inputs_dict["points"]
    keypoints = self.sample_key_points(points, None)  # [B, K, 3]
    batch_size, num_keypoints, _ = keypoints.shape
    batch = torch.arange(batch_size, device=keypoints.device)
    features = []
    if self.bev_cfg is not None:
        bev = self.interpolate_from_bev_features(
            keypoints, feats_dict["spatial_feats"], batch_size, self.bev_cfg.bev_scale_factor
        )
        features.append(bev.contiguous())
    key_xyz = keypoints.view(-1, 3)
    key_cnt = torch.full((batch_size,), num_keypoints, dtype=torch.int32, device=keypoints.device)
    if self.rawpoints_sa_layer is not None:
        stacked = torch.cat(points, dim=0)
        _, pooled = self.rawpoints_sa_layer(
            xyz=stacked[:, :3].contiguous(),
            xyz_batch_cnt=torch.cat([_count(p) for p in points]),
            new_xyz=key_xyz.contiguous(),
            new_xyz_batch_cnt=key_cnt,
            features=stacked[:, 3:].contiguous(),
        )
        features.append(pooled.contiguous().view(batch_size, num_keypoints, -1))
    for k, layer in enumerate(self.voxel_sa_layers or []):
        sparse = feats_dict["multi_scale_3d_feats"][k]
        coors = sparse.indices
        xyz = self.get_voxel_centers(coors=coors, scale_factor=self.voxel_sa_configs_list[k].scale_factor)
        _, pooled = layer(
            xyz=xyz.contiguous(),
            xyz_batch_cnt=(coors[:, 0].view(1, -1) == batch.view(-1, 1)).sum(1).int(),
            new_xyz=key_xyz.contiguous(),
            new_xyz_batch_cnt=key_cnt,
            features=sparse.features.contiguous(),
        )
        features.append(pooled.contiguous().view(batch_size, num_keypoints, -1))
    point_features = torch.cat(features, dim=-1).view(batch_size * num_keypoints, -1, 1)
    fusion = self.point_feature_fusion_layer(point_features.unsqueeze(dim=-1)).squeeze(dim=-1)
    batch_col = batch.to(key_xyz.dtype).view(-1, 1).expand(batch_size, num_keypoints).reshape(-1, 1)
    return dict(
        keypoint_features=point_features.squeeze(dim=-1),
        fusion_keypoint_features=fusion.squeeze(dim=-1),
        keypoints=torch.cat((batch_col, key_xyz), dim=-1),
    )


@register(
    "stack_query_and_group.functional",
    "mmdet3d.models.layers.pointnet_modules.stack_point_sa_module:StackQueryAndGroup.forward",
    "zeroes empty balls with boolean-mask writes (data-dependent index_put)",
)
def stack_query_and_group(self, xyz, xyz_batch_cnt, new_xyz, new_xyz_batch_cnt, features=None):
    """The original with ``torch.where`` for its masked writes; the same ops otherwise."""
    from mmdet3d.models.layers.pointnet_modules import stack_point_sa_module as m

    idx = m.ball_query(0, self.radius, self.sample_nums, xyz, new_xyz, xyz_batch_cnt, new_xyz_batch_cnt)
    empty = (idx[:, 0] == -1).view(-1, 1, 1)  # [M, 1, 1]
    idx = torch.where(empty[:, :, 0], torch.zeros_like(idx), idx)
    grouped_xyz = m.grouping_operation(xyz, idx, xyz_batch_cnt, new_xyz_batch_cnt) - new_xyz.unsqueeze(-1)
    grouped_xyz = torch.where(empty, torch.zeros_like(grouped_xyz), grouped_xyz)
    if features is None:
        assert self.use_xyz, "Cannot have not features and not use xyz as a feature!"
        return grouped_xyz, idx
    # the original groups the zeroed idx, then zeroes the empty balls' features; here every slot
    # of an empty ball is -1, out of the cloud, which the grouping reads as 0 (the same zeros,
    # without a pass over the [M, C, S] features)
    out_of_cloud = torch.where(empty[:, :, 0], torch.full_like(idx, -1), idx)
    grouped_features = m.grouping_operation(features, out_of_cloud, xyz_batch_cnt, new_xyz_batch_cnt)
    if self.use_xyz:
        return torch.cat([grouped_xyz, grouped_features], dim=1), idx
    return grouped_features, idx


def dense_grid_points(grid_size: int, rois: Tensor) -> Tensor:
    """``Batch3DRoIGridExtractor.get_dense_grid_points`` without ``nonzero()``: the cell indices of
    a ``grid_size**3`` grid in the same (x-major) order, from a static ``meshgrid``."""
    from mmdet3d.structures.bbox_3d import rotation_3d_in_axis

    steps = torch.arange(grid_size, device=rois.device, dtype=rois.dtype)
    cells = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), dim=-1).reshape(1, -1, 3)
    local = (cells + 0.5) / grid_size - 0.5
    center = torch.cat([rois[:, :2], rois[:, 2:3] + rois[:, 5:6] / 2], dim=1)  # bottom -> gravity centre
    grid = local * rois[:, 3:6].view(-1, 1, 3)
    grid = rotation_3d_in_axis(grid, rois[:, 6], axis=2)
    return grid + center.view(-1, 1, 3)


@register(
    "roi_grid_extractor.static",
    "mmdet3d.models.roi_heads.roi_extractors.batch_roigridpoint_extractor:Batch3DRoIGridExtractor.forward",
    "batch size from int(batch_inds.max()) (data-dependent); grid built with nonzero()",
)
def roi_grid_extractor(self, feats: Tensor, coordinate: Tensor, batch_inds: Tensor, rois: Tensor) -> Tensor:
    """The original with the wrapper's static batch size, per-sample counts from comparisons and
    the grid from ``dense_grid_points``."""
    batch = torch.arange(static_batch_size(), device=rois.device)
    xyz_batch_cnt = (batch_inds.view(1, -1) == batch.view(-1, 1)).sum(1).int()
    roi_grid = dense_grid_points(self.grid_size, rois[:, 1:])  # [R, G^3, 3]
    rois_batch_cnt = (rois[:, 0].int().view(1, -1) == batch.view(-1, 1)).sum(1)
    new_xyz_batch_cnt = (rois_batch_cnt * roi_grid.shape[1]).int()
    _, pooled = self.roi_grid_pool_layer(
        xyz=coordinate.contiguous(),
        xyz_batch_cnt=xyz_batch_cnt,
        new_xyz=roi_grid.reshape(-1, 3),
        new_xyz_batch_cnt=new_xyz_batch_cnt,
        features=feats.contiguous(),
    )
    return pooled.view(-1, self.grid_size, self.grid_size, self.grid_size, pooled.shape[-1])


@register(
    "anchor3d.float_range",
    "mmdet3d.models.task_modules.anchor.anchor_3d_generator:Anchor3DRangeGenerator.anchors_single_range",
    "torch.linspace with 0-d tensor ends and one step converts to an ONNX CastLike of the wrong rank",
)
def anchors_single_range(
    self, feature_size, anchor_range, scale=1, sizes=[[3.9, 1.6, 1.56]], rotations=[0, 1.5707963], device="cuda"
) -> Tensor:
    """``Anchor3DRangeGenerator.anchors_single_range`` with the range ends as Python floats (the
    float32 values the original's ``torch.tensor(anchor_range)`` holds, so the anchors are bitwise
    the same).  The original's ``linspace(tensor[2], tensor[5], 1)`` (KITTI's one z step) exports
    with torch 2.13's dynamo exporter to a ``CastLike`` that ``onnx.checker`` rejects (the
    onnxscript optimiser folds it away for graphs small enough to optimise; PV-RCNN's is not)."""
    if len(feature_size) == 2:
        feature_size = [1, feature_size[0], feature_size[1]]
    lo_x, lo_y, lo_z, hi_x, hi_y, hi_z = (float(np.float32(v)) for v in anchor_range)
    z_centers = torch.linspace(lo_z, hi_z, feature_size[0], device=device)
    y_centers = torch.linspace(lo_y, hi_y, feature_size[1], device=device)
    x_centers = torch.linspace(lo_x, hi_x, feature_size[2], device=device)
    sizes = torch.tensor(sizes, device=device).reshape(-1, 3) * scale
    rotations = torch.tensor(rotations, device=device)
    rets = list(torch.meshgrid(x_centers, y_centers, z_centers, rotations, indexing="ij"))
    tile_shape = [1, 1, 1, int(sizes.shape[0]), 1]
    rets = [r.unsqueeze(-2).repeat(tile_shape).unsqueeze(-1) for r in rets]
    tile_size_shape = list(rets[0].shape)
    tile_size_shape[3] = 1
    rets.insert(3, sizes.reshape([1, 1, 1, -1, 1, 3]).repeat(tile_size_shape))
    ret = torch.cat(rets, dim=-1).permute([2, 1, 0, 3, 4, 5])
    if len(self.custom_values) > 0:
        ret = torch.cat([ret, ret.new_zeros([*ret.shape[:-1], len(self.custom_values)])], dim=-1)
    return ret


# the patches PV-RCNN's export needs on top of patches.points' op swaps
PV_RCNN_PATCHES = (
    "pv_rcnn.static_batch_size",
    "pv_rcnn.fixed_proposals",
    "vsa.key_points",
    "vsa.static",
    "stack_query_and_group.functional",
    "roi_grid_extractor.static",
    "anchor3d.float_range",
)
