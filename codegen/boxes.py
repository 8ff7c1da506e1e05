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

from .ops.nms import nms_bev_fixed, nms_normal_bev_fixed

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
