"""Patches for voxel-based single-stage detectors (VoxelNet: PointPillars, SECOND, ...)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ..ops.scatter import BevConv, scatter_conv_to_bev, scatter_to_bev
from ..ops.voxel_slots import encode_by_point_count, slot_limits
from . import register, static_batch_size


@register(
    "voxelnet.static_batch_size",
    "mmdet3d.models.detectors.voxelnet:VoxelNet.extract_feat",
    "batch size is coors[-1, 0].item() + 1: data-dependent, breaks torch.export",
)
def voxelnet_extract_feat(self, batch_inputs_dict: dict):
    voxel_dict = batch_inputs_dict["voxels"]
    voxels, num_points, coors = voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"]
    voxel_features = encode_voxels(self.voxel_encoder, voxels, num_points, coors)
    return dense_tail(self, voxel_features, coors)


# below this many slots per voxel the groups do not pay (CenterPoint pillar: 20 slots, 79 % full)
MIN_SLOTS_TO_GROUP = 32


def encode_voxels(encoder: torch.nn.Module, voxels: Tensor, num_points: Tensor, coors: Tensor, *args) -> Tensor:
    """``encoder(voxels, num_points, coors, *args)``; by point-count groups with fewer slots
    (``ops.voxel_slots``) for the encoders where that is exact: PillarFeatureNet with max
    pooling and HardVFE without image fusion, with at least ``MIN_SLOTS_TO_GROUP`` slots."""
    from mmdet3d.models.voxel_encoders import HardVFE, PillarFeatureNet

    max_pooled = type(encoder) is PillarFeatureNet and all(pfn.mode == "max" for pfn in encoder.pfn_layers)
    unfused = type(encoder) is HardVFE and encoder.fusion_layer is None
    if voxels.shape[1] < MIN_SLOTS_TO_GROUP or not (max_pooled or unfused):
        return encoder(voxels, num_points, coors, *args)
    return encode_by_point_count(
        lambda v, n, c: encoder(v, n, c, *args), voxels, num_points, coors, slot_limits(voxels.shape[1])
    )


def dense_tail(detector, voxel_features: Tensor, coors: Tensor, prefix: str = ""):
    """Middle encoder (with the wrapper's static batch size) -> backbone -> optional neck: the part
    every voxel detector's ``extract_feat`` shares; ``prefix="pts_"`` for the MVX detectors.

    A pillar scatter followed by a SECOND backbone hands the backbone's first conv + BN + ReLU to
    the scatter (``first_layer``), which convolves the pillar rows instead of the empty canvas."""
    middle = getattr(detector, prefix + "middle_encoder")
    backbone = getattr(detector, prefix + "backbone")
    first = fusable_first_layer(middle, backbone)
    if first is None:
        x = backbone(middle(voxel_features, coors, static_batch_size()))
    else:
        x = middle(voxel_features, coors, static_batch_size(), first_layer=first)
        x = backbone.blocks[0][2](x).permute(0, 3, 1, 2)  # an elementwise ReLU: applied channels-last, as the output
        outs = []
        for i, block in enumerate(backbone.blocks):
            x = block[3:](x) if i == 0 else block(x)
            outs.append(x)
        x = tuple(outs)  # SECOND.forward's output
    if getattr(detector, f"with_{prefix}neck"):
        x = getattr(detector, prefix + "neck")(x)
    return x


@register(
    "mvx.static_batch_size",
    "mmdet3d.models.detectors.mvx_two_stage:MVXTwoStageDetector.extract_pts_feat",
    "batch size is the tensor coors[-1, 0] + 1: data-dependent loop in the scatter",
)
def mvx_extract_pts_feat(self, voxel_dict: dict, points=None, img_feats=None, batch_input_metas=None):
    if not self.with_pts_bbox:
        return None
    voxels, num_points, coors = voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"]
    voxel_features = encode_voxels(self.pts_voxel_encoder, voxels, num_points, coors, img_feats, batch_input_metas)
    return dense_tail(self, voxel_features, coors, prefix="pts_")


@register(
    "pillar_scatter.vectorized",
    "mmdet3d.models.middle_encoders.pillar_scatter:PointPillarsScatter.forward",
    "per-sample Python loop with boolean masks (data-dependent shapes)",
)
def pillars_scatter_forward(
    self, voxel_features: Tensor, coors: Tensor, batch_size=None, first_layer: BevConv | None = None
) -> Tensor:
    # the caller's batch_size may be a tensor (MVX detectors): the wrapper's static one rules
    if first_layer is not None:
        return scatter_conv_to_bev(voxel_features, coors, static_batch_size(), self.ny, self.nx, first_layer)
    return scatter_to_bev(voxel_features, coors, static_batch_size(), self.ny, self.nx)


def fusable_first_layer(middle: torch.nn.Module, backbone: torch.nn.Module) -> BevConv | None:
    """The first conv of a SECOND backbone with its eval BatchNorm folded in, when the middle
    encoder is a pillar scatter whose patched forward takes it and the block starts with plain
    Conv2d, BatchNorm (eval, running statistics), ReLU, as in every SECOND-backbone pillar config of
    mmdet3d 1.4.0; else None (e.g. the RegNet-backbone PointPillars configs)."""
    from mmdet3d.models.backbones import SECOND
    from mmdet3d.models.middle_encoders import PointPillarsScatter

    # the patched scatters (.vectorized, .padded) take it; the original does not
    takes_it = "first_layer" in inspect.signature(type(middle).forward).parameters
    if not (isinstance(middle, PointPillarsScatter) and takes_it):
        return None
    if type(backbone) is not SECOND or len(backbone.blocks[0]) < 3:
        return None
    conv, norm, act = backbone.blocks[0][:3]
    plain = (
        type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
    )
    eval_norm = (
        isinstance(norm, torch.nn.modules.batchnorm._BatchNorm)
        and norm.affine
        and norm.running_var is not None
        and not norm.training
    )
    if not (plain and eval_norm and type(act) is torch.nn.ReLU):
        return None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return BevConv(conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding)


@register(
    "pillar_feature_net.functional",
    "mmdet3d.models.voxel_encoders.pillar_encoder:PillarFeatureNet.forward",
    "legacy=True writes into a view of its input (the caller's voxels change; ScatterElements in ONNX)",
)
def pillar_feature_net_forward(self, features: Tensor, num_points: Tensor, coors: Tensor, *args, **kwargs) -> Tensor:
    """PillarFeatureNet.forward without in-place writes, numerically identical (legacy too).

    In legacy mode the original overwrites x, y, z of ``features`` with the offsets from the pillar
    centre before the decorations are concatenated, so the first three channels and the distance
    feature are computed from the offsets; this reproduces that explicitly.
    """
    dtype = features.dtype
    xyz = features[:, :, :3]
    parts = []
    if self._with_cluster_center:
        points_mean = xyz.sum(dim=1, keepdim=True) / num_points.type_as(features).view(-1, 1, 1)
        f_cluster = xyz - points_mean
    base = features
    if self._with_voxel_center:
        centers = torch.stack(
            [
                coors[:, 3].to(dtype).unsqueeze(1) * self.vx + self.x_offset,
                coors[:, 2].to(dtype).unsqueeze(1) * self.vy + self.y_offset,
                coors[:, 1].to(dtype).unsqueeze(1) * self.vz + self.z_offset,
            ],
            dim=-1,
        )
        f_center = xyz - centers
        if self.legacy:
            base = torch.cat([f_center, features[:, :, 3:]], dim=-1)
    parts.append(base)
    if self._with_cluster_center:
        parts.append(f_cluster)
    if self._with_voxel_center:
        parts.append(f_center)
    if self._with_distance:
        parts.append(torch.norm(base[:, :, :3], 2, 2, keepdim=True))
    features = torch.cat(parts, dim=-1)
    # empty slots of each pillar stay zero
    slots = torch.arange(features.shape[1], dtype=torch.int, device=features.device).view(1, -1)
    mask = (num_points.int().unsqueeze(1) > slots).unsqueeze(-1).type_as(features)
    features = features * mask
    for pfn in self.pfn_layers:
        features = pfn(features, num_points)
    return features.squeeze(1)


@register(
    "parta2.static_batch_size",
    "mmdet3d.models.detectors.parta2:PartA2.extract_feat",
    "batch size is coors[-1, 0].item() + 1: data-dependent, breaks torch.export",
)
def parta2_extract_feat(self, batch_inputs_dict: dict) -> dict:
    """PartA2's extract_feat up to the RPN head's input: SparseUNet's encoder and BEV output
    (``spatial_features``) -> backbone -> neck, with the wrapper's static batch size.  The
    UNet's decoder (``seg_features``) only feeds the RoI stage, which is not exported."""
    from mmdet3d.models.middle_encoders.sparse_unet import SparseConvTensor  # spconv's or mmcv's, as the UNet's

    voxel_dict = batch_inputs_dict["voxels"]
    features = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
    unet = self.middle_encoder
    x = unet.conv_input(SparseConvTensor(features, voxel_dict["coors"].int(), unet.sparse_shape, static_batch_size()))
    for encoder_layer in unet.encoder_layers:
        x = encoder_layer(x)
    spatial = unet.conv_out(x).dense()
    n, c, d, h, w = spatial.shape
    spatial = spatial.view(n, c * d, h, w)
    x = self.backbone(spatial)
    return {"spatial_features": spatial, "neck_feats": self.neck(x) if self.with_neck else x}


@register(
    "sassd.static_batch_size",
    "mmdet3d.models.detectors.sassd:SASSD.extract_feat",
    "batch size is coors[-1, 0].item() + 1: data-dependent, breaks torch.export",
)
def sassd_extract_feat(self, batch_inputs_dict: dict, test_mode: bool = True):
    """SASSD's extract_feat at inference: its middle encoder in test mode returns the dense BEV
    features and no auxiliary point outputs (those only feed the training loss)."""
    voxel_dict = batch_inputs_dict["voxels"]
    voxel_features = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["num_points"], voxel_dict["coors"])
    x, _ = self.middle_encoder(voxel_features, voxel_dict["coors"], static_batch_size(), test_mode=True)
    x = self.backbone(x)
    if self.with_neck:
        x = self.neck(x)
    return x
