"""The one registry of per-model export recipes.

A recipe says, for one model family, what differs from the shared pipeline: which patches make
it exportable, which part of the sample its tensor path reads and which call is that tensor
path. The head (``HEADS``, by head type) names the outputs and says how to decode boxes.
Adding a model is adding one ``Recipe(...)`` entry (and, for a new head type, one ``Head``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import ExportError
from ..patches.bevfusion import CAMERA_PATCHES as BEVFUSION_CAMERA_PATCHES
from ..patches.bevfusion import LIDAR_PATCHES as BEVFUSION_LIDAR_PATCHES
from ..patches.bevfusion import reselect_queries
from ..patches.mono3d import reselect_prior_classes
from ..patches.points import POINT_OP_PATCHES, POINT_PATCHES, STACKED_POINT_PATCHES, reselect_topk
from ..patches.pv_rcnn import PV_RCNN_PATCHES


@dataclass(frozen=True)
class Head:
    groups: tuple[str, ...]  # names of the head's top-level outputs ("task{}": one per task)
    boxes: str | None = None  # codegen.boxes decoder, "{head}" is the head module expression
    # output name -> meaning, where analyze.HEAD_DESCRIPTIONS (written for BEV heads) does not fit
    descriptions: Mapping[str, str] = field(default_factory=dict)


MONO_OUTPUTS = {
    "cls_score": "class scores per image location of the level (logits; SMOKE: sigmoid, clamped)",
    "bbox_pred": "encoded 3D box per image location (offset, depth, size, yaw; PGD adds 2D box / keypoints)",
    "dir_cls_pred": "direction-bin logits per image location",
    "attr_pred": "attribute logits per image location",
    "centerness": "centerness logit per image location",
    "depth_cls_pred": "depth-bin logits per image location (PGD's probabilistic depth)",
    "weight": "location-aware depth weight per image location",
}

TRANSFUSION_OUTPUTS = {  # per query: [batch, channels, num_proposals]
    "center": "box centre (x, y) of each query in BEV feature cells (query cell + offset)",
    "height": "box centre height z of each query",
    "dim": "log box size (x_size, y_size, z_size) of each query",
    "rot": "yaw of each query as (sin, cos)",
    "vel": "velocity (vx, vy) of each query",
    "heatmap": "class logits of each query",
    "query_heatmap_score": "heatmap score of each query's cell (non-maxima zeroed), per class",
    "dense_heatmap": "class heatmap logits per BEV cell (the queries are its top scores)",
    "query_labels": "class of each query (the heatmap class it was selected from)",
    "query_index": "heatmap index of each query: class * cells + BEV cell (row-major); -1 if unpatched",
}

PV_RCNN_OUTPUTS = {  # patches.pv_rcnn.forward_fixed_proposals: RPN maps, K proposal slots, RoI head per slot
    "rois": "proposal boxes (x, y, z, x_size, y_size, z_size, yaw) from the RPN's fixed-K NMS, by score; zero after num_rois",
    "roi_scores": "proposal scores (best class sigmoid), descending; zero after num_rois",
    "roi_labels": "proposal class index (best class); zero after num_rois",
    "num_rois": "number of valid proposal rows",
    "roi_cls_score": "RoI head confidence logit of each proposal slot (rows past num_rois: zero boxes, meaningless)",
    "roi_bbox_pred": "RoI head box deltas of each proposal slot, in the proposal's frame (DeltaXYZWLHRBBoxCoder)",
}

HEADS = {
    "Anchor3DHead": Head(("cls_score", "bbox_pred", "dir_cls_pred"), "boxes.anchor3d({head}, *head_outputs)"),
    "FreeAnchor3DHead": Head(("cls_score", "bbox_pred", "dir_cls_pred"), "boxes.anchor3d({head}, *head_outputs)"),
    # SSN: one small conv head per class group (shape-aware anchors), outputs concatenated per level
    "ShapeAwareHead": Head(("cls_score", "bbox_pred", "dir_cls_pred")),
    "CenterHead": Head(("task{}",), "boxes.centerpoint({head}, head_outputs)"),
    "VoteHead": Head(()),  # a dict of named tensors
    "PointRPNHead": Head(("bbox_preds", "cls_preds"), descriptions={
        "bbox_preds": "per point: box regression (PointXYZWHLRBBoxCoder, bin-based) [B, N, 8]",
        "cls_preds": "per point: foreground logits [B, N, num_classes]",
    }),
    "RPNHead": Head(("cls_score", "bbox_pred"), descriptions={
        "cls_score": "RPN objectness per anchor, one map per FPN level [B, A, H, W]",
        "bbox_pred": "RPN anchor deltas (DeltaXYWHBBoxCoder), one map per FPN level [B, A*4, H, W]",
    }),
    "GroupFree3DHead": Head(()),  # a dict of named tensors (proposal + one prediction set per decoder layer)
    # monocular heads: one list per output kind, one map per FPN level (None kinds are left out)
    "FCOSMono3DHead": Head(("cls_score", "bbox_pred", "dir_cls_pred", "attr_pred", "centerness"), descriptions=MONO_OUTPUTS),
    "PGDHead": Head(
        ("cls_score", "bbox_pred", "dir_cls_pred", "depth_cls_pred", "weight", "attr_pred", "centerness"),
        descriptions=MONO_OUTPUTS,
    ),
    "SMOKEMono3DHead": Head(("cls_score", "bbox_pred"), descriptions=MONO_OUTPUTS),
    "TransFusionHead": Head((), descriptions=TRANSFUSION_OUTPUTS),  # BEVFusion: patches.bevfusion.head_outputs
    "PartA2RPNHead": Head(("cls_score", "bbox_pred", "dir_cls_pred")),  # PartA2's RPN (an Anchor3DHead)
}


@dataclass(frozen=True)
class Recipe:
    name: str
    matches: Callable[[dict], bool]  # cfg.model -> does this recipe apply?
    patches: tuple[str, ...]  # names in codegen.patches.REGISTRY
    inputs: tuple[str, ...]  # sample paths the tensor path reads, in argument order
    call: str  # the model's tensor path, as the wrapper's forward writes it
    head: str  # attribute of the detector holding the dense head
    atol: float = 1e-4
    rtol: float = 1e-4
    min_dim: int = 2  # smallest size of a dynamic axis (0 and 1 get specialised)
    # what validation compares against: "original" (the eager model, patches off) or "patched"
    # (the patched eager wrapper, for models whose original cannot run here, e.g. mmcv ops
    # without a CPU kernel); generate's sample run uses the same
    reference: str = "original"
    # the patches under which mmdet3d's own ``model.predict`` (voxelization, box decoding and
    # post-processing included) runs on this CPU, for recipes whose original cannot; None: the
    # recipe's ``patches`` (the tensor path's) suffice
    predict_patches: tuple[str, ...] | None = None
    # component type -> patches, replacing COMPONENT_PATCHES' entry for this recipe only
    component_patches: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # validate.validate's reselect, bound by export: for outputs that hang on a choice among tied
    # scores, the reference re-run with the runtime's choice (patches.bevfusion.reselect_queries)
    reselect: Callable | None = None
    # head type -> Head, replacing HEADS' entry for this recipe only
    heads: Mapping[str, Head] = field(default_factory=dict)
    # filled from HEADS by recipe_for()
    output_groups: tuple[str, ...] = ()
    boxes: str | None = None
    output_descriptions: Mapping[str, str] = field(default_factory=dict)


def _type(node, *names: str) -> bool:
    return node is not None and node.get("type") in names


VOXELS = ("inputs.voxels.voxels", "inputs.voxels.num_points", "inputs.voxels.coors")

# patches that come with a component, wherever it appears (added by recipe_for)
COMPONENT_PATCHES = {
    "PillarFeatureNet": ("pillar_feature_net.functional",),
    "PointPillarsScatter": ("pillar_scatter.vectorized",),
    "SparseEncoder": ("spconv.conv", "spconv.dense"),
    "SparseEncoderSASSD": ("spconv.conv", "spconv.dense"),
    "SparseUNet": ("spconv.conv", "spconv.dense"),
    "DynamicPillarFeatureNet": ("dynamic_pillar_feature_net.padded",),
    "DynamicVFE": ("dynamic_vfe.padded",),
    "DynamicSimpleVFE": ("dynamic_simple_vfe.padded",),
    # mmcv's deformable convolutions, wherever nested (DCNSeparateHead's dcn_config, a ResNet's dcn)
    "DCN": ("dcn.pack",),
    "DCNv2": ("dcnv2.pack",),
}
HARD_VOXEL_ENCODERS = ("PillarFeatureNet", "HardVFE", "HardSimpleVFE")
DYNAMIC_VOXEL_ENCODERS = ("DynamicPillarFeatureNet", "DynamicVFE", "DynamicSimpleVFE")
DENSE_MIDDLE_ENCODERS = ("PointPillarsScatter", "SparseEncoder")
# the dynamic encoders' patches return one row per point, padding rows marked by coors -1:
# middle encoders that skip those rows
PADDED_MIDDLE_ENCODERS = {
    "PointPillarsScatter": ("pillar_scatter.padded",),
    "SparseEncoder": ("sparse_encoder.padded", "spconv.conv", "spconv.dense"),
}


def _hard_voxels(m, prefix: str = "") -> bool:
    return _type(m.get(prefix + "voxel_encoder"), *HARD_VOXEL_ENCODERS) and _type(
        m.get(prefix + "middle_encoder"), *DENSE_MIDDLE_ENCODERS
    )


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="voxelnet",  # PointPillars, SECOND (KITTI, Waymo, ...)
        matches=lambda m: _type(m, "VoxelNet") and _hard_voxels(m),
        patches=("voxelnet.static_batch_size",),
        inputs=VOXELS,
        call="self.model._forward(batch_inputs_dict)",
        head="bbox_head",
    ),
    Recipe(
        name="mvx_lidar",  # CenterPoint pillar/voxel, PointPillars nuScenes/Lyft (MVXFasterRCNN), lidar only
        matches=lambda m: _type(m, "CenterPoint", "MVXFasterRCNN") and _hard_voxels(m, "pts_") and not m.get("img_backbone"),
        patches=("mvx.static_batch_size",),
        inputs=VOXELS,
        call='self.model.pts_bbox_head(self.model.extract_pts_feat(batch_inputs_dict["voxels"]))',
        head="pts_bbox_head",
    ),
    Recipe(
        name="dynamic_voxelnet",  # PointPillars / SECOND with dynamic voxelization (KITTI)
        matches=lambda m: _type(m, "DynamicVoxelNet")
        and _type(m.get("voxel_encoder"), *DYNAMIC_VOXEL_ENCODERS)
        and _type(m.get("middle_encoder"), *PADDED_MIDDLE_ENCODERS),
        patches=("dynamic_voxelnet.static_batch_size",),
        inputs=("inputs.voxels.voxels", "inputs.voxels.coors"),  # per point: the points, their voxel coors
        call="self.model._forward(batch_inputs_dict)",
        head="bbox_head",
        reference="patched",  # mmcv's DynamicScatter has no CPU kernel
        predict_patches=("dynamic_scatter.torch",),
        component_patches=PADDED_MIDDLE_ENCODERS,
    ),
)

RECIPES += (
    Recipe(
        name="votenet",  # VoteNet, Group-Free 3D (SUN RGB-D, ScanNet): a fixed-size point sample in, head out
        matches=lambda m: _type(m, "VoteNet", "GroupFree3DNet") and _type(m.get("backbone"), "PointNet2SASSG"),
        patches=POINT_OP_PATCHES,
        inputs=("inputs.points",),
        call="self.model._forward(batch_inputs_dict)",
        head="bbox_head",
        reference="patched",  # mmcv's point ops are CUDA-only: the original cannot run on a CPU
        predict_patches=POINT_PATCHES,  # + the points-in-boxes ops of the box post-processing
        reselect=reselect_topk,  # Group-Free 3D's top-k seed sampling among near-equal logits
        # not 3DSSD (SSD3DNet): it exports (PT2 0), but its F-FPS samples by distances between
        # learned features, where onnxruntime's float error (1e-6) changes the picks (seed_indices
        # differ from the first divergence on); a reselect would have to force 1024 FPS steps
    ),
)

RECIPES += (
    Recipe(
        name="point_rcnn",  # PointRCNN (KITTI): a fixed-size point sample in, the point-wise RPN predictions out
        matches=lambda m: _type(m, "PointRCNN") and _type(m.get("backbone"), "PointNet2SAMSG"),
        patches=POINT_OP_PATCHES,
        inputs=("inputs.points",),
        call="self.model.rpn_head(self.model.extract_feat(batch_inputs_dict))",
        head="rpn_head",
        reference="patched",  # mmcv's point ops are CUDA-only: the original cannot run on a CPU
    ),
)

RECIPES += (
    Recipe(
        name="parta2",  # Part-A2 (KITTI): voxels in, the RPN head's maps out (the RoI stage is not exported)
        matches=lambda m: _type(m, "PartA2")
        and _type(m.get("voxel_encoder"), *HARD_VOXEL_ENCODERS)
        and _type(m.get("middle_encoder"), "SparseUNet"),
        patches=("parta2.static_batch_size",),
        inputs=VOXELS,
        call='self.model.rpn_head(self.model.extract_feat(batch_inputs_dict)["neck_feats"])',
        head="rpn_head",
        predict_patches=("points.roiaware_pool3d",),  # mmdet3d's own predict: its RoI stage pools with a CUDA-only op
    ),
)

RECIPES += (
    Recipe(
        name="pv_rcnn",  # PV-RCNN (KITTI): voxels + points in; RPN head, K proposals, RoI head out
        matches=lambda m: _type(m, "PointVoxelRCNN") and _type(m.get("points_encoder"), "VoxelSetAbstraction"),
        patches=STACKED_POINT_PATCHES + PV_RCNN_PATCHES,
        inputs=VOXELS + ("inputs.points",),
        call="self.model._forward(batch_inputs_dict)",  # patches.pv_rcnn: fixed-K two-stage forward
        head="rpn_head",
        reference="patched",  # mmcv's stacked point ops are CUDA-only: the original cannot run on a CPU
        predict_patches=STACKED_POINT_PATCHES,  # the original two-stage predict with the stacked ops swapped
        heads={"PartA2RPNHead": Head((), descriptions=PV_RCNN_OUTPUTS)},  # patches.pv_rcnn's two-stage forward
    ),
)

RECIPES += (
    # BEVFusion (projects/ of an mmdetection3d checkout, codegen.checkout): points in, voxelized in
    # the graph; the original runs here with codegen.checkout's stand-ins for its compiled ops
    Recipe(
        name="bevfusion_lidar",
        matches=lambda m: _type(m, "BEVFusion") and not m.get("img_backbone"),
        patches=BEVFUSION_LIDAR_PATCHES,
        inputs=("inputs.points",),
        call="patches.bevfusion.head_outputs(self.model, batch_inputs_dict)",
        head="bbox_head",
        reference="patched",  # the original's heatmap argsort has no tie rule (patches.bevfusion.top_k_by_score)
        reselect=reselect_queries,
    ),
    Recipe(
        name="bevfusion",  # lidar + six cameras (their calibrations are inputs too)
        matches=lambda m: _type(m, "BEVFusion") and _type(m.get("view_transform"), "DepthLSSTransform"),
        patches=BEVFUSION_LIDAR_PATCHES + BEVFUSION_CAMERA_PATCHES,
        inputs=("inputs.points", "inputs.imgs", "inputs.cam"),
        call="patches.bevfusion.head_outputs(self.model, batch_inputs_dict)",
        head="bbox_head",
        reference="patched",  # the original's heatmap argsort has no tie rule (patches.bevfusion.top_k_by_score)
        reselect=reselect_queries,
    ),
)

RECIPES += (
    Recipe(
        name="sassd",  # SA-SSD (KITTI): SECOND with an auxiliary point branch that only trains
        matches=lambda m: _type(m, "SASSD")
        and _type(m.get("voxel_encoder"), *HARD_VOXEL_ENCODERS)
        and _type(m.get("middle_encoder"), "SparseEncoderSASSD"),
        patches=("sassd.static_batch_size",),
        inputs=VOXELS,
        call="self.model._forward(batch_inputs_dict)",
        head="bbox_head",
    ),
    Recipe(
        name="mono3d",  # FCOS3D, PGD (nuScenes, KITTI, Waymo), SMOKE: one camera image in, head maps out
        matches=lambda m: _type(m, "FCOSMono3D", "SMOKEMono3D"),
        # DCNv2 in code, not in the config: the heads' dcn_on_last_conv, SMOKE's DLANeck (use_dcn=True)
        patches=("dcnv2.pack",),
        inputs=("inputs.imgs",),
        call="self.model._forward(batch_inputs_dict)",
        head="bbox_head",
        # onnxruntime's float error (a few 1e-6 relative to a map's scale, as on every score map)
        # grows in two decoded kinds of output: PGD's keypoint offsets are raw conv outputs times
        # stride x regress range (up to 512 px: 1.24e-3 off on KITTI 000008, in a map reaching 400),
        # SMOKE's orientation is F.normalize(v) (error divided by |v|: 3e-4 where v is short)
        atol=2e-3,
        reselect=reselect_prior_classes,  # PGD's per-class depth / size priors: the top class at near-tied logits
    ),
)

RECIPES += (
    Recipe(
        # mmdet's two-stage 2D detectors shipped for nuImages (Mask / Cascade Mask R-CNN, HTC): the
        # image in, backbone + FPN + the RPN head's maps out (the RoI stages are not exported)
        name="rpn_2d",
        matches=lambda m: _type(m, "MaskRCNN", "CascadeRCNN", "HybridTaskCascade", "FasterRCNN"),
        patches=(),
        inputs=("inputs.imgs",),
        call='self.model.rpn_head(self.model.extract_feat(batch_inputs_dict["imgs"]))',
        head="rpn_head",
    ),
)

BY_NAME = {r.name: r for r in RECIPES}
assert len(BY_NAME) == len(RECIPES), "recipe names must be unique"
assert all(r.reference in ("original", "patched") for r in RECIPES), "reference: 'original' or 'patched'"
OUTPUT_MODES = ("head", "boxes")


def _describe(model_cfg) -> str:
    keys = ("voxel_encoder", "middle_encoder", "backbone", "bbox_head")
    parts = [model_cfg.get("type")]
    for k in keys:
        node = model_cfg.get(k) or model_cfg.get("pts_" + k)
        if node:
            parts.append(node.get("type"))
    return " / ".join(map(str, parts))


def _component_types(node) -> list[str]:
    """The ``type`` of every component in a config tree, depth first: nested components (a DCN
    inside a head's ``dcn_config``, a backbone's ``dcn``) bring their patches too."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.append(node["type"])
        for value in node.values():
            found += _component_types(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            found += _component_types(value)
    return found


def recipe_for(model_cfg) -> Recipe:
    """The recipe for a config's model, completed with its head's output names and decoder."""
    for recipe in RECIPES:
        if recipe.matches(model_cfg):
            head_type = (model_cfg.get(recipe.head) or {}).get("type")
            head = recipe.heads.get(head_type) or HEADS.get(head_type)
            if head is None:
                raise ExportError(f"unsupported head {head_type} for recipe {recipe.name} ({_describe(model_cfg)})")
            boxes = head.boxes.format(head=f"self.model.{recipe.head}") if head.boxes else None
            patches = list(recipe.patches)
            component_patches = {**COMPONENT_PATCHES, **recipe.component_patches}
            for component in _component_types(model_cfg):
                for name in component_patches.get(component, ()):
                    if name not in patches:
                        patches.append(name)
            return dataclasses.replace(
                recipe, patches=tuple(patches), output_groups=head.groups, boxes=boxes, output_descriptions=head.descriptions
            )
    raise ExportError(f"unsupported model: no export recipe for {_describe(model_cfg)}")
