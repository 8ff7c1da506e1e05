"""Decoded boxes with fixed shapes: head outputs -> (bboxes_3d [K, D], scores_3d [K], labels_3d [K], num_boxes).

Each decoder reproduces a head's ``predict_by_feat`` (mmdet3d 1.4.0) for batch size 1 with the
data-dependent parts made static: the score threshold becomes a validity mask, NMS is
``codegen.ops.nms`` with a fixed number of kept boxes, and the result is padded to K rows
(sorted by score, padding rows zero, ``num_boxes`` valid). After dropping the padding the rows
equal ``model.predict`` sorted by score (tested in tests/test_boxes.py, tests/test_boxes_centerpoint.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .ops.nms import box_iou_rotated, greedy_nms, nms_bev_fixed, nms_normal_bev_fixed, priority_weight, top_k_indices, top_k_mask, xyxyr_to_xywhr

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


def parta2_proposals(head, cls_scores: list[Tensor], bbox_preds: list[Tensor], dir_cls_preds: list[Tensor], cfg=None):
    """``PartA2RPNHead.predict_by_feat`` (PartA2, PV-RCNN proposals) for one sample with fixed shapes.

    Per level: direction bin, sigmoid scores, best class; the ``nms_pre`` best anchors by that
    score (``top_k_indices``: ties by lower anchor index, also at the cut), decoded.  Then the
    class-agnostic ``nms_bev`` (rotated IoU ``>= nms_thr``) over the anchors with
    ``score > score_thr``, keeping ``K = nms_post`` boxes in score order (the original sorts the
    kept boxes by score and cuts them at ``nms_post``: the same rows), and the direction fix of
    the yaw.  Equal scores are visited by lower anchor index (the original's sorts leave their
    order unspecified; with random weights whole empty regions of the BEV map tie).
    Returns ``bboxes [K, code_size]``, ``scores [K]``, ``labels [K]`` (int64) and ``num`` (int64
    scalar); rows past ``num`` are zero.  (The original's ``cls_preds``, which PV-RCNN's RoI head
    does not read, is left out.)"""
    cfg = head.test_cfg if cfg is None else cfg
    sizes = [c.shape[-2:] for c in cls_scores]
    priors = [p.reshape(-1, head.box_code_size) for p in head.prior_generator.grid_anchors(sizes, device=cls_scores[0].device)]
    all_boxes, all_max, all_labels, all_dirs = [], [], [], []
    for cls_score, bbox_pred, dir_pred, prior in zip(cls_scores, bbox_preds, dir_cls_preds, priors):
        dir_score = torch.max(dir_pred[0].permute(1, 2, 0).reshape(-1, 2), dim=-1)[1]
        cls = cls_score[0].permute(1, 2, 0).reshape(-1, head.num_classes)
        scores = cls.sigmoid() if head.use_sigmoid_cls else cls.softmax(-1)
        bbox = bbox_pred[0].permute(1, 2, 0).reshape(-1, head.box_code_size)
        max_scores, labels = scores.max(dim=1) if head.use_sigmoid_cls else scores[:, :-1].max(dim=1)
        nms_pre = cfg.get("nms_pre", -1)
        if 0 < nms_pre < scores.shape[0]:
            top = top_k_indices(max_scores, nms_pre)
            prior, bbox, dir_score = prior[top], bbox[top], dir_score[top]
            max_scores, labels = max_scores[top], labels[top]
        all_boxes.append(head.bbox_coder.decode(prior, bbox))
        all_max.append(max_scores)
        all_labels.append(labels)
        all_dirs.append(dir_score)
    boxes, max_scores, labels = torch.cat(all_boxes), torch.cat(all_max), torch.cat(all_labels)
    dirs = torch.cat(all_dirs)
    bev = xywhr_to_xyxyr(boxes[:, [0, 1, 3, 4, 6]])
    nms = nms_bev_fixed if cfg.use_rotate_nms else nms_normal_bev_fixed
    keep, num = nms(bev, max_scores, cfg.nms_thr, cfg.nms_post, valid=max_scores > cfg.get("score_thr", 0))
    valid = keep >= 0
    safe = keep.clamp(min=0)
    boxes, max_scores, labels, dirs = boxes[safe], max_scores[safe], labels[safe], dirs[safe]
    rot = limit_period(boxes[:, 6] - head.dir_offset, head.dir_limit_offset, np.pi)
    yaw = rot + head.dir_offset + np.pi * dirs.to(boxes.dtype)
    boxes = torch.cat([boxes[:, :6], yaw.unsqueeze(1), boxes[:, 7:]], dim=1)
    zero = lambda t: torch.where(valid.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))
    return zero(boxes), zero(max_scores), zero(labels), num


# ---------------------------------------------------------------------------------------------
# CenterPoint (CenterHead)
#
# All tasks are decoded and suppressed together on [T, ...] tensors (T = number of tasks): the
# graph is about T times smaller than one pass per task, which matters because the ONNX
# exporter's optimizer takes time growing faster than linearly with the graph size.
# ---------------------------------------------------------------------------------------------


def _rank_order(values: Tensor) -> Tensor:
    """Positions of ``values`` (``[..., k]``) ordered by value descending, equal values by lower
    position: a TopK over ``priority_weight``'s distinct keys (the same order on every runtime)."""
    return torch.topk(priority_weight(values), values.shape[-1], dim=-1).indices


def topk_ordered(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(x, k, dim=-1)`` with ties resolved identically on every runtime.

    The ``k`` largest values of each row, equal values by lower index (also at the cut),
    ordered by value descending then index ascending.  ``torch.topk`` leaves the order of equal
    values (and which of them make the cut) unspecified in eager while ONNX TopK takes the
    lower index, so the raw op could give the exported graph another box order than eager.
    Here TopK only ranks distinct keys: ``top_k_mask`` fixes the set (the first tied values by
    index fill it up at the cut), a TopK over ``-index`` lists that set by index, and
    ``_rank_order`` sorts it by value (``x.shape[-1] < 2**24``)."""
    n = x.shape[-1]
    take = top_k_mask(x, k)
    index = torch.arange(n, device=x.device).to(torch.float32)
    key = torch.where(take, -index, torch.full_like(index, -math.inf))
    idx = torch.topk(key, k, dim=-1).indices  # the taken ones by increasing index
    idx = torch.gather(idx, -1, _rank_order(torch.gather(x, -1, idx)))
    return torch.gather(x, -1, idx), idx


def _in_range(boxes: Tensor, limits) -> Tensor:
    """Centre inside ``limits`` (x_min, y_min, z_min, x_max, y_max, z_max), bounds included.
    ``limits`` may be a tensor: ``CenterPointBBoxCoder.decode`` replaces its list by one."""
    if isinstance(limits, Tensor):
        lim = limits.to(device=boxes.device, dtype=boxes.dtype)
    else:
        lim = torch.tensor([float(v) for v in limits], dtype=boxes.dtype, device=boxes.device)
    return (boxes[..., :3] >= lim[:3]).all(-1) & (boxes[..., :3] <= lim[3:]).all(-1)


def centerpoint_decode(coder, heat: Tensor, reg: Tensor, rot: Tensor, hei: Tensor, dim: Tensor, vel: Tensor | None):
    """``CenterPointBBoxCoder.decode`` for one sample and ``T`` tasks at once, filters as a mask.

    ``heat`` ``[T, C, H, W]``: sigmoid heatmaps (tasks with fewer classes padded with -inf);
    ``reg [T, 2, H, W]``, ``rot`` (sine, cosine) ``[T, 2, H, W]``, ``hei [T, 1, H, W]``, ``dim``
    (already ``exp``-ed when ``norm_bbox``) ``[T, 3, H, W]``, ``vel [T, 2, H, W]`` or None.
    The original's two-stage top-k (``max_num`` per class, then ``max_num`` over those) selects
    the ``max_num`` best of all ``classes x H x W`` cells, done here in one ``topk_ordered`` per
    task (ties by class, then cell).  Returns boxes ``[T, M, code_size]``, scores ``[T, M]``
    (descending), class ids ``[T, M]`` (int64, within the task) and ``mask`` ``[T, M]``
    (``post_center_range`` and ``score > score_threshold``), ``M = coder.max_num``."""
    t, _, height, width = heat.shape
    scores, flat = topk_ordered(heat.reshape(t, -1), coder.max_num)
    clses = torch.div(flat, height * width, rounding_mode="floor")
    inds = flat % (height * width)
    maps = [reg, rot, hei, dim] + ([] if vel is None else [vel])
    feats = torch.cat(maps, dim=1).reshape(t, -1, height * width)
    cells = torch.gather(feats, 2, inds.unsqueeze(1).expand(-1, feats.shape[1], -1)).transpose(1, 2)  # [T, M, F]
    sizes = [m.shape[1] for m in maps]  # reg 2, rot 2, height 1, dim 3, (vel 2); reg and rot by channel
    dx, dy, rot_sine, rot_cosine, hei, dim, *vel = torch.split(cells, [1, 1, 1, 1, *sizes[2:]], dim=-1)
    xs = (inds % width).to(heat.dtype).unsqueeze(-1) + dx
    ys = torch.div(inds, width, rounding_mode="floor").to(heat.dtype).unsqueeze(-1) + dy
    # the original's operation order: xs * out_size_factor * voxel_size + pc_range
    xs = xs * coder.out_size_factor * coder.voxel_size[0] + coder.pc_range[0]
    ys = ys * coder.out_size_factor * coder.voxel_size[1] + coder.pc_range[1]
    boxes = torch.cat([xs, ys, hei, dim, torch.atan2(rot_sine, rot_cosine), *vel], dim=-1)
    if coder.post_center_range is None:
        raise NotImplementedError("CenterPointBBoxCoder.decode needs post_center_range (as the original)")
    mask = _in_range(boxes, coder.post_center_range)
    if coder.score_threshold:  # the original skips a threshold of 0 / None
        mask = mask & (scores > coder.score_threshold)
    return boxes, scores, clses, mask


def circle_overlap(centers: Tensor, thresh) -> Tensor:
    """``circle_nms``'s suppression test for all pairs: squared BEV centre distance ``<= thresh``
    (``centers`` ``[..., N, 2]`` -> bool ``[..., N, N]``; float32 like the original's numpy on
    the float32 boxes; ``thresh`` a float or a tensor broadcasting to ``[..., 1, 1]``)."""
    dx = centers[..., :, None, 0] - centers[..., None, :, 0]
    dy = centers[..., :, None, 1] - centers[..., None, :, 1]
    return dx * dx + dy * dy <= thresh


def centerpoint_max_boxes(head, cfg=None) -> list[int]:
    """Per task, how many boxes ``centerpoint`` can return: ``post_max_size`` bounded by the
    coder's ``max_num`` (and by ``pre_max_size`` for rotate NMS).  K is their sum."""
    cfg = head.test_cfg if cfg is None else cfg
    n = head.bbox_coder.max_num
    if cfg["nms_type"] == "rotate" and cfg.get("pre_max_size") is not None:
        n = min(n, cfg["pre_max_size"])
    post = cfg.get("post_max_size")
    return [n if post is None else min(post, n)] * len(head.num_classes)


def centerpoint(head, preds_dicts, cfg=None):
    """``CenterHead.predict_by_feat`` (CenterPoint) for one sample with fixed shapes.

    ``preds_dicts``: what ``CenterHead.forward`` returns, one entry per task, each a list (one
    per feature level; only the first is used, as in the original) of dicts with ``reg, height,
    dim, rot, (vel,) heatmap``.  Per task: ``CenterPointBBoxCoder.decode`` (top-``max_num`` over
    the heatmap; ``post_center_range`` and ``score_threshold`` become a mask), then

    * ``nms_type='rotate'`` (``get_task_detections``): ``score >= test_cfg.score_threshold``,
      the ``pre_max_size`` best of those (the decoded boxes are sorted by score, so a rank
      mask), ``nms_bev`` (rotated IoU ``>= nms_thr``, ``codegen.ops.nms.box_iou_rotated``)
      keeping ``post_max_size``, then the ``post_center_limit_range`` filter;
    * ``nms_type='circle'``: ``circle_nms`` (squared centre distance ``<= min_radius[task]``)
      keeping ``post_max_size``.

    Labels get the offset of the task's first class.  The candidates of all tasks are ranked by
    score (ties by task, then rank in the task) into ``K = sum(centerpoint_max_boxes(head))``
    rows (6 tasks x 83 = 498 for the nuScenes configs) and get the original's ``z -= h / 2``.
    Returns ``bboxes_3d [K, code_size]``, ``scores_3d [K]``, ``labels_3d [K]`` (int64) and
    ``num_boxes``; rows past ``num_boxes`` are zero.  Equal scores are ranked by lower index
    throughout (the original's sorts leave their order unspecified).
    """
    cfg = head.test_cfg if cfg is None else cfg
    nms_type = cfg["nms_type"]
    if nms_type not in ("rotate", "circle"):
        raise ValueError(f"unsupported nms_type {nms_type!r}")
    max_out = centerpoint_max_boxes(head, cfg)[0]
    preds = [task_preds[0] for task_preds in preds_dicts]
    num_tasks = len(preds)
    stack = lambda key: torch.cat([p[key] for p in preds])  # [T, c, H, W] (batch size 1)
    heats = [p["heatmap"].sigmoid() for p in preds]
    num_cls = max(h.shape[1] for h in heats)
    pad = lambda h: h.new_full((1, num_cls - h.shape[1], *h.shape[2:]), -math.inf)  # never in the top-k
    heat = torch.cat([h if h.shape[1] == num_cls else torch.cat([h, pad(h)], 1) for h in heats])
    boxes, scores, clses, valid = centerpoint_decode(
        head.bbox_coder,
        heat,
        stack("reg"),
        stack("rot"),
        stack("height"),
        torch.exp(stack("dim")) if head.norm_bbox else stack("dim"),
        stack("vel") if "vel" in preds[0] else None,
    )  # [T, N, ...]; class ids of 1-class tasks are 0 (the original's zeros)
    n = scores.shape[1]
    if nms_type == "circle":
        radius = torch.tensor([float(r) for r in cfg["min_radius"][:num_tasks]], dtype=boxes.dtype, device=boxes.device)
        over = circle_overlap(boxes[..., :2], radius.view(-1, 1, 1))
    else:
        if cfg["score_threshold"] > 0.0:
            valid = valid & (scores >= cfg["score_threshold"])
        pre = cfg.get("pre_max_size")
        if pre is not None and pre < n:
            valid = valid & (torch.cumsum(valid.to(torch.int64), 1) <= pre)
        # nms_bev's xyxyr -> xywhr round trip, for the same float bits
        bev = xyxyr_to_xywhr(xywhr_to_xyxyr(boxes[..., [0, 1, 3, 4, 6]].reshape(-1, 5))).reshape(num_tasks, n, 5)
        over = torch.stack([box_iou_rotated(b, b) >= cfg["nms_thr"] for b in bev.unbind(0)])
    # the decoded boxes are in score order (ties by index): position is the visiting order
    weight = (n - torch.arange(n, device=scores.device)).to(torch.float32).expand(num_tasks, n)
    keep, _ = greedy_nms(over, weight, valid, max_out)  # [T, P]
    ok = (keep >= 0).reshape(-1)
    flat = (keep.clamp(min=0) + torch.arange(num_tasks, device=keep.device).unsqueeze(1) * n).reshape(-1)
    boxes = boxes.reshape(num_tasks * n, -1)[flat]
    scores = scores.reshape(-1)[flat]
    offsets = torch.tensor([sum(head.num_classes[:t]) for t in range(num_tasks)], device=clses.device)
    labels = (clses + offsets.unsqueeze(1)).reshape(-1)[flat]
    if nms_type == "rotate" and len(cfg.get("post_center_limit_range", [])) > 0:
        ok = ok & _in_range(boxes, cfg["post_center_limit_range"])
    scores = torch.where(ok, scores, torch.full_like(scores, -math.inf))
    order = _rank_order(scores)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    valid = torch.isfinite(scores)
    boxes = torch.cat([boxes[:, :2], (boxes[:, 2] - boxes[:, 5] * 0.5).unsqueeze(1), boxes[:, 3:]], dim=1)
    boxes = torch.where(valid.unsqueeze(1), boxes, torch.zeros_like(boxes))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    return boxes, scores, labels, valid.sum()
