"""PV-RCNN (PointVoxelRCNN, KITTI): eager prediction on the CPU and the export patches.

mmcv's stacked point ops and furthest point sampling are CUDA-only, so the original model cannot
run here: ``model.predict`` runs with ``patches.points.STACKED_POINT_PATCHES`` (the op swaps, tested
against the kernels in tests/ops/test_stack_points.py), and the exporter validates against the
*patched* eager model (recipe ``reference="patched"``). What ties the export patches
(``codegen/patches/pv_rcnn.py``) to mmdet3d is checked here on the real KITTI frame, one step of
the two-stage path at a time, each against mmdet3d's own code with only the ops swapped:

* ``extract_feat`` with the static batch size and the pure-torch sparse convolutions;
* the fixed-K proposals (``boxes.parta2_proposals``) against ``PartA2RPNHead.predict_by_feat``;
* the key points / set abstraction (``VoxelSetAbstraction``) and the RoI-grid pooling + box head
  (``PVRCNNRoiHead._bbox_forward``) on proposals placed on real points;
* the end-to-end export (slow: the graph has ~16k nodes, the eager model takes ~30-70 s a run).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mmengine.structures import InstanceData

from codegen import boxes, patches
from codegen import sample as smp
from codegen.patches.points import STACKED_POINT_PATCHES
from codegen.patches.pv_rcnn import PV_RCNN_PATCHES
from codegen.validate import one_thread
from conftest import frame_path

PV_RCNN = "pv_rcnn_8xb2-80e_kitti-3d-3class"
SPCONV = ("spconv.conv", "spconv.dense")


@pytest.fixture(scope="module")
def pv_rcnn():
    frame_path("KittiDataset")
    model = smp.load_model(PV_RCNN)
    return model, smp.sample_frame(model, smp.default_frame_ref(model.cfg))


@pytest.fixture(scope="module")
def first_stage(pv_rcnn):
    """The original first stage (spconv's CPU kernels, one thread): features and RPN outputs."""
    model, s = pv_rcnn
    with torch.no_grad(), one_thread():
        feats = model.extract_feat(smp.clone_tree(s.data["inputs"]))
        rpn_outs = model.rpn_head(feats["neck_feats"])
    return feats, rpn_outs


def _inputs(s):
    return smp.clone_tree(s.data["inputs"])


def test_recipe():
    from codegen.configs import resolve_config
    from codegen.recipes import recipe_for

    recipe = recipe_for(smp.load_config(resolve_config(PV_RCNN)).model)
    assert recipe.name == "pv_rcnn" and recipe.reference == "patched"
    assert set(STACKED_POINT_PATCHES + PV_RCNN_PATCHES + SPCONV) == set(recipe.patches)
    assert recipe.predict_patches == STACKED_POINT_PATCHES  # mmdet3d's own predict: test below


def test_pv_rcnn_cannot_run_on_cpu_without_the_patches(pv_rcnn):
    model, s = pv_rcnn
    with torch.no_grad(), pytest.raises(Exception) as info:
        model.predict(_inputs(s), s.data["data_samples"])
    assert "cuda" in str(info.value).lower()


def test_pv_rcnn_predicts_on_cpu_with_the_patches(pv_rcnn):
    model, s = pv_rcnn
    with torch.no_grad(), one_thread(), patches.applied(STACKED_POINT_PATCHES):
        pred = model.predict(_inputs(s), s.data["data_samples"])[0].pred_instances_3d
        again = model.predict(_inputs(s), s.data["data_samples"])[0].pred_instances_3d
    n = pred.scores_3d.shape[0]
    assert n > 0 and pred.bboxes_3d.tensor.shape == (n, 7)
    assert torch.isfinite(pred.bboxes_3d.tensor).all() and torch.isfinite(pred.scores_3d).all()
    assert pred.labels_3d.max() < 3  # Pedestrian, Cyclist, Car
    # deterministic: the patched ops have fixed tie rules (spconv on one thread)
    assert torch.equal(pred.bboxes_3d.tensor, again.bboxes_3d.tensor)
    assert torch.equal(pred.scores_3d, again.scores_3d)
    # and the originals are back afterwards
    import mmcv.ops
    from mmdet3d.models.layers.pointnet_modules import stack_point_sa_module
    from mmdet3d.models.middle_encoders import voxel_set_abstraction

    assert stack_point_sa_module.ball_query is mmcv.ops.ball_query
    assert stack_point_sa_module.grouping_operation is mmcv.ops.grouping_operation
    assert voxel_set_abstraction.furthest_point_sample is mmcv.ops.furthest_point_sample


def test_anchors_patch_is_bitwise_equal(pv_rcnn):
    model, _ = pv_rcnn
    generator = model.rpn_head.prior_generator
    want = generator.grid_anchors([(200, 176)], device="cpu")[0]
    with patches.applied(("anchor3d.float_range",)):
        got = generator.grid_anchors([(200, 176)], device="cpu")[0]
    assert got.shape == (1, 200, 176, 3, 2, 7) and torch.equal(got, want)


def test_static_extract_feat_equals_the_original(pv_rcnn, first_stage):
    """Static batch size + pure-torch sparse convolutions: the same multi-scale sparse features
    (sites in the same order) and BEV maps as mmdet3d with spconv's CPU kernels."""
    model, s = pv_rcnn
    feats, _ = first_stage
    with torch.no_grad(), patches.applied(("pv_rcnn.static_batch_size",) + SPCONV, batch_size=1):
        got = model.extract_feat(_inputs(s))
    for key in ("spatial_feats", "neck_feats"):
        want = feats[key][0] if isinstance(feats[key], list) else feats[key]
        have = got[key][0] if isinstance(got[key], list) else got[key]
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    assert len(got["multi_scale_3d_feats"]) == 4
    for have, want in zip(got["multi_scale_3d_feats"], feats["multi_scale_3d_feats"]):
        assert torch.equal(have.indices, want.indices)
        torch.testing.assert_close(have.features, want.features, atol=1e-5, rtol=1e-5)


def test_fixed_proposals_equal_predict_by_feat(pv_rcnn, first_stage):
    """``boxes.parta2_proposals`` against ``PartA2RPNHead.predict_by_feat`` (mmcv's CPU
    nms_rotated). With random weights every empty BEV cell gets the same score (35k anchors tie
    for the maximum), and the original leaves the order of ties unspecified; random per-anchor
    offsets of the logits make the scores distinct, then both must keep the same boxes."""
    model, s = pv_rcnn
    head = model.rpn_head
    cls_scores, bbox_preds, dir_preds = first_stage[1]
    g = torch.Generator().manual_seed(0)
    cls_scores = [c + torch.randn(c.shape, generator=g) for c in cls_scores]
    metas = [d.metainfo for d in s.data["data_samples"]]
    with torch.no_grad():
        want = head.predict_by_feat(cls_scores, bbox_preds, dir_preds, batch_input_metas=metas, cfg=head.test_cfg)[0]
        rois, scores, labels, num = boxes.parta2_proposals(head, cls_scores, bbox_preds, dir_preds)
    k = head.test_cfg.nms_post
    assert rois.shape == (k, 7) and int(num) == want.scores_3d.shape[0] == k
    assert want.scores_3d.unique().numel() == k  # no ties left
    torch.testing.assert_close(rois, want.bboxes_3d.tensor, atol=0, rtol=0)
    torch.testing.assert_close(scores, want.scores_3d, atol=0, rtol=0)
    assert torch.equal(labels, want.labels_3d)
    # a strict score threshold leaves fewer than K: the count says so, the rest is zero
    cfg = head.test_cfg.copy()
    cfg.score_thr = float(want.scores_3d[40])
    with torch.no_grad():
        want = head.predict_by_feat(cls_scores, bbox_preds, dir_preds, batch_input_metas=metas, cfg=cfg)[0]
        rois, scores, labels, num = boxes.parta2_proposals(head, cls_scores, bbox_preds, dir_preds, cfg)
    n = int(num)
    assert n == want.scores_3d.shape[0] < k
    torch.testing.assert_close(rois[:n], want.bboxes_3d.tensor, atol=0, rtol=0)
    assert (rois[n:] == 0).all() and (scores[n:] == 0).all()


def _proposals_on_points(s, n: int = 40) -> torch.Tensor:
    """``n`` car-sized boxes on real KITTI points (seeded), plus one far outside the cloud whose
    RoI-grid balls are all empty."""
    points = s.data["inputs"]["points"][0]
    g = torch.Generator().manual_seed(1)
    centres = points[torch.randperm(points.shape[0], generator=g)[:n], :3]
    sizes = torch.rand(n, 3, generator=g) * torch.tensor([3.0, 1.0, 1.0]) + torch.tensor([1.0, 0.6, 1.2])
    yaw = (torch.rand(n, 1, generator=g) - 0.5) * 2 * np.pi
    rois = torch.cat([centres - torch.tensor([0.0, 0.0, 0.8]), sizes, yaw], dim=1)
    far = torch.tensor([[60.0, 35.0, -1.0, 4.0, 1.7, 1.5, 0.3]])
    return torch.cat([rois, far])


def test_vsa_and_roi_head_patches_equal_the_original(pv_rcnn, first_stage):
    """Key points, set abstraction and RoI-grid pooling with the export patches against
    mmdet3d's modules with only the CUDA ops swapped, on proposals placed on real points."""
    model, s = pv_rcnn
    feats, _ = first_stage
    rois = _proposals_on_points(s)
    batched = torch.cat([rois.new_zeros(rois.shape[0], 1), rois], dim=1)

    def second_stage():
        pf = model.points_encoder(_inputs(s), feats, None)
        seg = model.roi_head.semantic_head(pf["keypoint_features"])["seg_preds"]
        point_features = pf["fusion_keypoint_features"] * seg.sigmoid().max(dim=-1, keepdim=True).values
        return pf, model.roi_head._bbox_forward(point_features, pf["keypoints"], batched)

    # 512 key points instead of the config's 2048: the same code at a quarter of the cost (the
    # ball queries are [key points x points]); the end-to-end export runs the config's 2048
    encoder, keypoints = model.points_encoder, model.points_encoder.num_keypoints
    encoder.num_keypoints = 512
    try:
        with torch.no_grad(), one_thread():
            with patches.applied(STACKED_POINT_PATCHES):
                want_pf, want = second_stage()
            with patches.applied(STACKED_POINT_PATCHES + PV_RCNN_PATCHES, batch_size=1):
                got_pf, got = second_stage()
    finally:
        encoder.num_keypoints = keypoints
    assert got_pf["keypoints"].shape == (512, 4)
    assert torch.equal(got_pf["keypoints"], want_pf["keypoints"])
    for key in ("keypoint_features", "fusion_keypoint_features"):
        torch.testing.assert_close(got_pf[key], want_pf[key], atol=1e-5, rtol=1e-5)
    assert got["bbox_scores"].shape == (rois.shape[0], 1) and got["bbox_reg"].shape == (rois.shape[0], 7)
    torch.testing.assert_close(got["bbox_scores"], want["bbox_scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["bbox_reg"], want["bbox_reg"], atol=1e-5, rtol=1e-5)
    # the proposals see different points: the RoI head's outputs differ between them
    assert got["bbox_reg"][:-1].std(0).min() > 0


# ------------------------------------------------------------------ end to end


def _export(tmp_path, fmt: str) -> dict:
    from conftest import REPO, cli

    frame_path("KittiDataset")
    out = tmp_path / "pv_rcnn"
    # ~5 min of CPU; 16 min of wall time were measured on the shared 2-core machine
    proc = cli("--config", PV_RCNN, "--output-dir", str(out), "--format", fmt, "--device", "cpu", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["export_info"]["input_names"] == ["voxels", "num_points", "coors", "points"]
    assert meta["validation"]["passed"], meta["validation"]["summary"]
    assert meta["validation"]["reference"] == "patched"
    assert len({r["size"] for r in meta["validation"]["rows"]}) == 2, "two point counts validated"
    names = [o["name"] for o in meta["outputs"]]
    assert {"cls_score", "bbox_pred", "dir_cls_pred", "rois", "num_rois", "roi_cls_score", "roi_bbox_pred"} <= set(names)
    wrapper = next(out.glob("wrapper_*.py"))
    assert wrapper.read_text() == (REPO / "generated" / wrapper.name).read_text()
    return meta


@pytest.mark.slow
def test_pv_rcnn_exports_and_matches_the_patched_model(tmp_path):
    """Voxels + points in; RPN maps, 100 proposals and the RoI head out, PT2 and ONNX. Slow:
    ~16k graph nodes (2047 unrolled FPS steps, 100 NMS steps, the sparse convolutions) take
    minutes to export and convert, and each eager run of the model ~15 s of CPU."""
    meta = _export(tmp_path, "both")
    assert set(meta["validation"]["max_abs_diff"]) == {"eager-patched", "pt2", "onnx"}
    assert max(meta["validation"]["max_abs_diff"].values()) < 1e-4
