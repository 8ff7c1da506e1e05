"""The one registry of per-model export recipes.

A recipe says, for one model family, what differs from the shared pipeline: which patches make
it exportable, which part of the sample its tensor path reads, how its outputs are named, and
the parity tolerance. Adding a model is adding one ``Recipe(...)`` entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ExportError


@dataclass(frozen=True)
class Recipe:
    name: str
    matches: Callable[[dict], bool]  # cfg.model -> does this recipe apply?
    patches: tuple[str, ...]  # names in codegen.patches.REGISTRY
    inputs: tuple[str, ...]  # sample paths the tensor path reads ("inputs.voxels")
    output_groups: tuple[str, ...]  # names of the head's top-level outputs
    call: str = "self.model._forward(batch_inputs_dict)"  # the model's tensor path
    # head outputs -> fixed-size decoded boxes (codegen/boxes.py); None: no --outputs boxes
    boxes: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    min_dim: int = 2  # smallest size of a dynamic axis (0 and 1 get specialised)


def _type(node, *names: str) -> bool:
    return node is not None and node.get("type") in names


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="pointpillars",
        matches=lambda m: _type(m, "VoxelNet")
        and _type(m.get("voxel_encoder"), "PillarFeatureNet")
        and _type(m.get("middle_encoder"), "PointPillarsScatter")
        and _type(m.get("bbox_head"), "Anchor3DHead"),
        patches=("voxelnet.static_batch_size", "pillar_scatter.vectorized", "pillar_feature_net.functional"),
        inputs=("inputs.voxels.voxels", "inputs.voxels.num_points", "inputs.voxels.coors"),
        output_groups=("cls_score", "bbox_pred", "dir_cls_pred"),
        boxes="boxes.anchor3d(self.model.bbox_head, *head_outputs)",
    ),
    Recipe(
        name="centerpoint_pillar",
        matches=lambda m: _type(m, "CenterPoint")
        and _type(m.get("pts_voxel_encoder"), "PillarFeatureNet")
        and _type(m.get("pts_middle_encoder"), "PointPillarsScatter")
        and _type(m.get("pts_bbox_head"), "CenterHead"),
        patches=("mvx.static_batch_size", "pillar_scatter.vectorized", "pillar_feature_net.functional"),
        inputs=("inputs.voxels.voxels", "inputs.voxels.num_points", "inputs.voxels.coors"),
        output_groups=("task{}",),
        call='self.model.pts_bbox_head(self.model.extract_pts_feat(batch_inputs_dict["voxels"]))',
    ),
)

BY_NAME = {r.name: r for r in RECIPES}
assert len(BY_NAME) == len(RECIPES), "recipe names must be unique"


OUTPUT_MODES = ("head", "boxes")


def recipe_for(model_cfg) -> Recipe:
    for recipe in RECIPES:
        if recipe.matches(model_cfg):
            return recipe
    parts = [model_cfg.get("type")] + [
        model_cfg[k].get("type") for k in ("voxel_encoder", "middle_encoder", "backbone", "bbox_head") if model_cfg.get(k)
    ]
    raise ExportError(f"unsupported model: no export recipe for {' / '.join(map(str, parts))}")
