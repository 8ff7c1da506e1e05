"""Decoded boxes with fixed shapes: head outputs -> (bboxes_3d [K, D], scores_3d [K], labels_3d [K], num_boxes).

Each decoder reproduces a head's ``predict_by_feat`` (mmdet3d 1.4.0) for batch size 1 with the
data-dependent parts made static: the score threshold becomes a validity mask, NMS is
``codegen.ops.nms`` with a fixed number of kept boxes, and the result is padded to K rows
(sorted by score, padding rows zero, ``num_boxes`` valid). After dropping the padding the rows
equal ``model.predict`` sorted by score (tested in tests/test_boxes.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .ops.nms import greedy_select, nms_bev_fixed, nms_normal_bev_fixed

BOX_OUTPUTS = ("bboxes_3d", "scores_3d", "labels_3d", "num_boxes")


def limit_period(val: Tensor, offset: float, period: float) -> Tensor:
    """mmdet3d's ``limit_period`` on tensors."""
    return val - torch.floor(val / period + offset) * period


def xywhr_to_xyxyr(boxes: Tensor) -> Tensor:
    """mmdet3d's ``xywhr2xyxyr`` without in-place writes."""
    half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
    return torch.stack(
        [boxes[:, 0] - half_w, boxes[:, 1] - half_h, boxes[:, 0] + half_w, boxes[:, 1] + half_h, boxes[:, 4]], dim=-1
    )


def multiclass_nms_fixed(
    bboxes: Tensor, bboxes_for_nms: Tensor, scores: Tensor, score_thr: float, max_num: int, cfg, extras: tuple = ()
) -> tuple[Tensor, Tensor, Tensor, tuple, Tensor]:
    """``box3d_multiclass_nms`` with static shapes.

    ``scores`` ``[N, num_classes]`` (no background column). Per class the boxes above the score
    threshold go through BEV NMS; at most ``max_num`` per class can survive the final top-K, so
    each class keeps ``min(max_num, N)``. Candidates of all classes are then ranked by score
    (top-k; equal scores may come in any order, as with the original's unstable sort) and the
    best ``max_num`` returned, padded. Returns (bboxes, scores, labels, extras, count).
    """
    n, num_classes = scores.shape
    per_class = min(max_num, n)
    nms = nms_bev_fixed if cfg.get("use_rotate_nms", True) else nms_normal_bev_fixed
    cand_idx, cand_score, cand_label = [], [], []
    for c in range(num_classes):
        valid = scores[:, c] > score_thr
        keep, _ = nms(bboxes_for_nms, scores[:, c], cfg.nms_thr, per_class, valid=valid)
        ok = keep >= 0
        safe = keep.clamp(min=0)
        cand_idx.append(safe)
        cand_score.append(torch.where(ok, scores[:, c][safe], torch.full_like(scores[:, c][safe], -math.inf)))
        cand_label.append(torch.full_like(safe, c))
    idx, score, label = torch.cat(cand_idx), torch.cat(cand_score), torch.cat(cand_label)
    k = min(max_num, idx.shape[0])
    order = torch.topk(score, k).indices  # TopK in ONNX (aten.sort.stable has no ONNX lowering)
    idx, score, label = idx[order], score[order], label[order]
    valid = torch.isfinite(score)
    count = valid.sum()
    zero = lambda t: torch.where(valid.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))
    return (
        zero(bboxes[idx]),
        zero(score),
        torch.where(valid, label, torch.zeros_like(label)),
        tuple(zero(e[idx]) for e in extras),
        count,
    )


def anchor3d(head, cls_scores: list[Tensor], bbox_preds: list[Tensor], dir_cls_preds: list[Tensor], cfg=None):
    """``Anchor3DHead.predict_by_feat`` for one sample (PointPillars, SECOND, ...)."""
    cfg = head.test_cfg if cfg is None else cfg
    sizes = [c.shape[-2:] for c in cls_scores]
    priors = [p.reshape(-1, head.box_code_size) for p in head.prior_generator.grid_anchors(sizes, device=cls_scores[0].device)]
    all_boxes, all_scores, all_dirs = [], [], []
    for cls_score, bbox_pred, dir_pred, prior in zip(cls_scores, bbox_preds, dir_cls_preds, priors):
        dir_score = torch.max(dir_pred[0].permute(1, 2, 0).reshape(-1, 2), dim=-1)[1]
        cls = cls_score[0].permute(1, 2, 0).reshape(-1, head.num_classes)
        scores = cls.sigmoid() if head.use_sigmoid_cls else cls.softmax(-1)
        bbox = bbox_pred[0].permute(1, 2, 0).reshape(-1, head.box_code_size)
        nms_pre = cfg.get("nms_pre", -1)
        if 0 < nms_pre < scores.shape[0]:
            max_scores = scores.max(dim=1)[0] if head.use_sigmoid_cls else scores[:, :-1].max(dim=1)[0]
            top = max_scores.topk(nms_pre)[1]
            prior, bbox, scores, dir_score = prior[top], bbox[top], scores[top], dir_score[top]
        all_boxes.append(head.bbox_coder.decode(prior, bbox))
        all_scores.append(scores)
        all_dirs.append(dir_score)
    boxes, scores, dirs = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_dirs)
    if not head.use_sigmoid_cls:
        scores = scores[:, :-1]
    bev = xywhr_to_xyxyr(boxes[:, [0, 1, 3, 4, 6]])
    boxes, scores, labels, (dirs,), count = multiclass_nms_fixed(
        boxes, bev, scores, cfg.get("score_thr", 0), cfg.max_num, cfg, (dirs,)
    )
    rot = limit_period(boxes[:, 6] - head.dir_offset, head.dir_limit_offset, np.pi)
    yaw = rot + head.dir_offset + np.pi * dirs.to(boxes.dtype)
    valid = torch.arange(boxes.shape[0], device=boxes.device) < count
    boxes = torch.cat([boxes[:, :6], torch.where(valid, yaw, torch.zeros_like(yaw)).unsqueeze(1), boxes[:, 7:]], dim=1)
    return boxes, scores, labels, count


# ---------------------------------------------------------------------------------------------
# CenterPoint (CenterHead)
# ---------------------------------------------------------------------------------------------


def _gather_cells(feat: Tensor, inds: Tensor) -> Tensor:
    """``CenterPointBBoxCoder._transpose_and_gather_feat`` for one sample: ``[1, C, H, W]`` at
    flat cell indices ``[M]`` -> ``[M, C]``."""
    return feat[0].reshape(feat.shape[1], -1)[:, inds].t()


def _centerpoint_decode(coder, heat: Tensor, rot_sine: Tensor, rot_cosine: Tensor, hei: Tensor, dim: Tensor, vel, reg):
    """``CenterPointBBoxCoder.decode`` for one sample with the filters as a mask.

    Returns boxes ``[M, code_size]``, scores ``[M]`` (sorted descending, as the original's
    top-k), class ids ``[M]`` (int64, within the task) and ``mask`` ``[M]`` (``post_center_range``
    and ``score > score_threshold``), ``M = coder.max_num``."""
    _, cat, height, width = heat.shape
    k = coder.max_num
    top_scores, top_inds = torch.topk(heat.reshape(1, cat, -1), k)  # per class
    scores, top_ind = torch.topk(top_scores.reshape(-1), k)  # over all classes
    clses = torch.div(top_ind, k, rounding_mode="floor")
    inds = top_inds.reshape(-1)[top_ind] % (height * width)
    ys = torch.div(inds, width, rounding_mode="floor").to(heat.dtype).unsqueeze(1)
    xs = (inds % width).to(heat.dtype).unsqueeze(1)
    if reg is not None:
        reg = _gather_cells(reg, inds)
        xs, ys = xs + reg[:, 0:1], ys + reg[:, 1:2]
    else:
        xs, ys = xs + 0.5, ys + 0.5
    rot = torch.atan2(_gather_cells(rot_sine, inds), _gather_cells(rot_cosine, inds))
    # same operation order as the original: xs * out_size_factor * voxel_size + pc_range
    xs = xs * coder.out_size_factor * coder.voxel_size[0] + coder.pc_range[0]
    ys = ys * coder.out_size_factor * coder.voxel_size[1] + coder.pc_range[1]
    parts = [xs, ys, _gather_cells(hei, inds), _gather_cells(dim, inds), rot]
    if vel is not None:
        parts.append(_gather_cells(vel, inds))
    boxes = torch.cat(parts, dim=1)
    if coder.post_center_range is None:
        raise NotImplementedError("CenterPointBBoxCoder.decode needs post_center_range (as the original)")
    mask = _in_range(boxes, coder.post_center_range)
    if coder.score_threshold:  # the original skips a threshold of 0 / None
        mask = mask & (scores > coder.score_threshold)
    return boxes, scores, clses, mask


def _in_range(boxes: Tensor, limits) -> Tensor:
    """Centre inside ``limits`` (x_min, y_min, z_min, x_max, y_max, z_max), bounds included."""
    lim = torch.tensor([float(v) for v in limits], dtype=boxes.dtype, device=boxes.device)
    return (boxes[:, :3] >= lim[:3]).all(1) & (boxes[:, :3] <= lim[3:]).all(1)


def circle_nms_fixed(centers: Tensor, scores: Tensor, thresh: float, max_out: int, valid: Tensor | None = None):
    """``mmdet3d.models.layers.circle_nms`` with fixed-size output: greedy by score, a kept box
    suppresses every box whose squared BEV centre distance is ``<= thresh``; the first
    ``max_out`` kept indices (padded with -1) and their count.  ``centers`` ``[N, 2]``.
    Tie rule as in ``greedy_select`` (equal scores -> lowest index; the original's numpy
    argsort order is implementation-defined there)."""
    dx = centers[:, None, 0] - centers[None, :, 0]
    dy = centers[:, None, 1] - centers[None, :, 1]
    over = dx * dx + dy * dy <= thresh
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    return greedy_select(over, scores, valid, max_out)


def centerpoint_max_boxes(head, cfg=None) -> list[int]:
    """Per task, how many boxes ``centerpoint`` can return: ``post_max_size`` bounded by the
    coder's ``max_num`` (and by ``pre_max_size`` for rotate NMS).  K is their sum."""
    cfg = head.test_cfg if cfg is None else cfg
    n = head.bbox_coder.max_num
    if cfg["nms_type"] == "rotate" and cfg.get("pre_max_size") is not None:
        n = min(n, cfg["pre_max_size"])
    post = cfg.get("post_max_size")
    per_task = n if post is None else min(post, n)
    return [per_task] * len(head.num_classes)


def centerpoint(head, preds_dicts, cfg=None):
    """``CenterHead.predict_by_feat`` (CenterPoint) for one sample with fixed shapes.

    ``preds_dicts``: what ``CenterHead.forward`` returns, one entry per task, each a list (one
    per feature level, only the first is used, as in the original) of dicts with ``reg, height,
    dim, rot, (vel,) heatmap``.  Per task: ``CenterPointBBoxCoder.decode`` (top-``max_num`` over
    the heatmap; ``post_center_range`` and ``score_threshold`` become a mask), then

    * ``nms_type='rotate'`` (``get_task_detections``): ``score >= test_cfg.score_threshold``,
      ``pre_max_size`` best (the decoded boxes are already sorted by score, so that is a rank
      mask), ``nms_bev`` (rotated IoU ``>= nms_thr``) keeping ``post_max_size``, the
      ``post_center_limit_range`` filter;
    * ``nms_type='circle'``: ``circle_nms`` (squared centre distance ``<= min_radius[task]``)
      keeping ``post_max_size``.

    Labels get the offset of the task's first class.  The candidates of all tasks are ranked by
    score (top-k) into ``K = sum(centerpoint_max_boxes(head))`` rows (6 x 83 = 498 for the
    nuScenes configs), then the original's ``z -= h / 2``.  Returns ``bboxes_3d [K, code_size]``,
    ``scores_3d [K]``, ``labels_3d [K]`` (int64), ``num_boxes``; rows past ``num_boxes`` are zero.
    """
    cfg = head.test_cfg if cfg is None else cfg
    nms_type = cfg["nms_type"]
    if nms_type not in ("rotate", "circle"):
        raise ValueError(f"unsupported nms_type {nms_type!r}")
    max_boxes = centerpoint_max_boxes(head, cfg)
    cand_boxes, cand_scores, cand_labels = [], [], []
    label_offset = 0
    for task_id, task_preds in enumerate(preds_dicts):
        p = task_preds[0]
        dim = torch.exp(p["dim"]) if head.norm_bbox else p["dim"]
        boxes, scores, clses, valid = _centerpoint_decode(
            head.bbox_coder,
            p["heatmap"].sigmoid(),
            p["rot"][:, 0:1],
            p["rot"][:, 1:2],
            p["height"],
            dim,
            p.get("vel"),
            p["reg"],
        )
        if nms_type == "circle":
            keep, _ = circle_nms_fixed(boxes[:, :2], scores, cfg["min_radius"][task_id], max_boxes[task_id], valid)
            ok = keep >= 0
        else:
            if cfg["score_threshold"] > 0.0:
                valid = valid & (scores >= cfg["score_threshold"])
            pre = cfg.get("pre_max_size")
            if pre is not None and pre < scores.shape[0]:
                valid = valid & (torch.cumsum(valid.to(torch.int64), 0) <= pre)
            bev = xywhr_to_xyxyr(boxes[:, [0, 1, 3, 4, 6]])
            keep, _ = nms_bev_fixed(bev, scores, cfg["nms_thr"], max_boxes[task_id], valid=valid)
            ok = keep >= 0
            if len(cfg.get("post_center_limit_range", [])) > 0:
                ok = ok & _in_range(boxes, cfg["post_center_limit_range"])[keep.clamp(min=0)]
        safe = keep.clamp(min=0)
        if head.num_classes[task_id] == 1:
            clses = torch.zeros_like(clses)
        cand_boxes.append(boxes[safe])
        cand_scores.append(torch.where(ok, scores[safe], torch.full_like(scores[safe], -math.inf)))
        cand_labels.append(clses[safe] + label_offset)
        label_offset += head.num_classes[task_id]
    boxes, scores, labels = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_labels)
    order = torch.topk(scores, scores.shape[0]).indices  # TopK in ONNX
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    valid = torch.isfinite(scores)
    boxes = torch.cat([boxes[:, :2], (boxes[:, 2] - boxes[:, 5] * 0.5).unsqueeze(1), boxes[:, 3:]], dim=1)
    boxes = torch.where(valid.unsqueeze(1), boxes, torch.zeros_like(boxes))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    return boxes, scores, labels, valid.sum()
