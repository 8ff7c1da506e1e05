"""Patches for BEVFusion (``projects/BEVFusion`` of an mmdetection3d checkout: ``codegen.checkout``).

BEVFusion has no ``_forward`` (it is ``pass``): ``head_outputs(model, inputs)`` is its tensor path,
points (and the six camera images with their calibrations) in, TransFusion head tensors out. The
original runs on a CPU once ``codegen.checkout`` provides its uncompiled ops (voxelization,
``bev_pool``); what stops it from exporting:

* ``extract_pts_feat``: voxelization through a compiled op, the batch size ``coors[-1, 0] + 1``
  (a tensor that sizes the sparse encoder's grid);
* ``TransFusionHead.forward_single``: ``argsort`` of the whole heatmap for the top 200 queries,
  integer ``//`` and ``%`` on the indices, in-place writes into slices of ``local_max``;
* ``extract_feat`` turns the camera matrices of the metainfo into tensors with NumPy;
* the depth view transform (``BaseDepthTransform.forward``): a Python loop over cameras with boolean
  masks (data-dependent shapes) writing lidar depths into the depth image; ``torch.inverse``
  (no ONNX translation); ``bev_pool`` sorts the frustum points and calls a compiled kernel.

Each patch keeps the original's arithmetic (same ops, same order) so that the patched eager model
equals the original bit for bit where the data allow; the exceptions are named where they occur.

**Ties.** The 200 queries are the top heatmap scores, and every empty BEV cell scores the same:
with random weights most selected scores are ties (7 distinct values on the nuScenes frame). The
original's ``argsort`` has no tie rule (its choice differs between CPU and CUDA), the patched head
takes the lower index (``top_k_by_score``); so the recipes validate against the patched eager
model, and a runtime whose last-bit differences make another choice among tied scores is compared
with the eager model run on that choice (``reselect_queries``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.bev_pool import lss_bev_pool
from ..ops.sort import top_k_keys
from ..ops.voxelize import _iota, hard_voxelize
from ..validate import within_tolerance
from . import register, static_batch_size

BEVFUSION = "projects.BEVFusion.bevfusion"
# the camera matrices BEVFusion reads from each sample's metainfo, and its default when absent
CAMERA_KEYS = ("lidar2img", "cam2img", "cam2lidar", "img_aug_matrix", "lidar_aug_matrix")
DEFAULT_EYE = ("img_aug_matrix", "lidar_aug_matrix")

LIDAR_PATCHES = ("bevfusion.pts_feat", "transfusion.topk", "spconv.conv", "spconv.dense")
CAMERA_PATCHES = ("bevfusion.extract_feat", "depth_lss.forward", "depth_lss.cam_feats", "lss.bev_pool")


def batch_metas(inputs: dict) -> list[dict]:
    """Per-sample metainfo dicts holding the camera matrices of ``inputs["cam"]`` (tensors, one
    row per sample): what the model reads from ``batch_input_metas``."""
    cams = inputs.get("cam") or {}
    return [{key: value[b] for key, value in cams.items()} for b in range(len(inputs["points"]))]


def head_outputs(model, inputs: dict) -> dict:
    """BEVFusion's tensor path: ``extract_feat`` -> TransFusion head (as ``predict`` runs them).

    The head's outputs (one level, one decoder layer: a dict of ``[B, ch, num_proposals]`` tensors
    and the ``dense_heatmap``) plus ``query_labels`` (class of each query, which the head keeps in
    an attribute for ``predict_by_feat``) and ``query_index`` (the selected flat heatmap index,
    ``class * cells + cell``; -1 from the unpatched head, which does not keep it)."""
    metas = batch_metas(inputs)
    feats = model.extract_feat(inputs, metas)
    (levels,) = model.bbox_head(feats, metas)
    out = dict(levels[0])
    out["query_labels"] = model.bbox_head.query_labels
    index = model.bbox_head.__dict__.pop("query_index", None)  # set by the patched head only
    out["query_index"] = index if index is not None else torch.full_like(out["query_labels"], -1)
    return out


# ---------------------------------------------------------------- validation of the query choice

_FORCED_QUERIES: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("forced_queries", default=None)


@contextlib.contextmanager
def forced_queries(index: Tensor) -> Iterator[None]:
    """Make the patched head select ``index`` (``[B, num_proposals]`` flat heatmap indices)."""
    token = _FORCED_QUERIES.set(index)
    try:
        yield
    finally:
        _FORCED_QUERIES.reset(token)


def _selected_scores(out: dict) -> np.ndarray:
    """Each query's heatmap score (at its own class), sorted per sample."""
    scores = np.asarray(out["query_heatmap_score"], dtype=np.float64)
    labels = np.asarray(out["query_labels"])
    return np.sort(np.take_along_axis(scores, labels[:, None, :], axis=1)[:, 0], axis=-1)


def _identity_classes(head) -> tuple[int, ...]:
    """Classes whose local maximum is the cell itself (kernel-1 pools in ``forward_single``)."""
    return {"nuScenes": (8, 9), "Waymo": (1, 2)}.get(head.test_cfg["dataset"], ())


def _mask_ties(head, dense_heatmap: np.ndarray, index: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """``[B, classes, num_proposals]``: is the local-maximum test of the queries' cells a tie, per
    class (the cell's score equals its largest neighbour's within the tolerance)? There the
    non-maximum mask of ``query_heatmap_score`` is a coin toss between runtimes."""
    heat = 1.0 / (1.0 + np.exp(-dense_heatmap.astype(np.float64)))  # [B, C, H, W]
    b, c, h, w = heat.shape
    k = head.nms_kernel_size
    pad = k // 2
    padded = np.pad(heat, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    neighbours = np.full_like(heat, -np.inf)
    for dy in range(k):
        for dx in range(k):
            if (dy, dx) != (pad, pad):
                neighbours = np.maximum(neighbours, padded[:, :, dy : dy + h, dx : dx + w])
    tie = within_tolerance(neighbours, heat, atol, rtol)
    tie[:, list(_identity_classes(head))] = False
    if pad:  # the border is never a local maximum in either runtime
        tie[:, :, :pad], tie[:, :, -pad:], tie[:, :, :, :pad], tie[:, :, :, -pad:] = False, False, False, False
    cells = index % (h * w)
    return np.take_along_axis(tie.reshape(b, c, h * w), np.broadcast_to(cells[:, None, :], (b, c, cells.shape[-1])), 2)


def reselect_queries(wrapper, output_names: Sequence[str], args, outputs, reference, atol: float, rtol: float):
    """The eager reference for the choices a runtime made among tied scores (``validate``'s
    ``reselect``), or None when it made the reference's.

    Which 200 of the 324,000 heatmap cells become queries is a discrete choice: where scores tie
    or nearly tie (every empty BEV cell has the same score), a runtime whose floats differ in the
    last bits (onnxruntime's convolutions) picks other cells, and every per-query output differs.
    When the runtime's ``query_index`` differs from the reference's, the patched eager model is
    run again with the runtime's queries forced, provided the runtime's choice is a valid top-k:
    its queries' eager scores equal the reference's selected scores (sorted) within the
    tolerance (otherwise None: the normal comparison fails). The same holds one level down: in
    a flat heatmap region "is this cell a local maximum" is a tie too, so ``query_heatmap_score``
    entries that one side zeroed are taken from the runtime where that test ties (``_mask_ties``)."""
    names = list(output_names)
    got = dict(zip(names, outputs))
    ref = dict(zip(names, reference))
    index = np.asarray(got["query_index"])
    alt = dict(ref)
    if not np.array_equal(index, np.asarray(ref["query_index"])):
        with forced_queries(torch.from_numpy(index.astype(np.int64))):
            alt = {n: o.detach().cpu().numpy() for n, o in zip(names, wrapper(*args))}
        if not within_tolerance(_selected_scores(alt), _selected_scores(ref), atol, rtol).all():
            return None
    score, runtime_score = np.asarray(alt["query_heatmap_score"]), np.asarray(got["query_heatmap_score"])
    masked_differently = (score == 0) != (runtime_score == 0)
    if masked_differently.any():
        ties = _mask_ties(wrapper.model.bbox_head, np.asarray(alt["dense_heatmap"]), index, atol, rtol)
        if not ties[masked_differently].all():
            return None
        alt["query_heatmap_score"] = np.where(masked_differently, runtime_score, score)
    if alt is ref or all(np.array_equal(alt[n], ref[n]) for n in names):
        return None
    return [alt[n] for n in names]


# ------------------------------------------------------------------------------- lidar branch


@register(
    "bevfusion.pts_feat",
    f"{BEVFUSION}.bevfusion:BEVFusion.extract_pts_feat",
    "compiled voxelization, batch size coors[-1, 0] + 1 (a tensor) sizes the sparse grid",
)
def extract_pts_feat(self, batch_inputs_dict: dict) -> Tensor:
    """``extract_pts_feat`` + ``voxelize`` with ``codegen.ops.voxelize`` (BEVFusion's kernel is
    mmcv's with ``(x, y, z)`` coordinates) and the wrapper's static batch size. The voxel count
    ``M`` is data-dependent (an unbacked size from here on, as in every sparse-conv model)."""
    layer = self.pts_voxel_layer
    max_voxels = layer.max_voxels[0] if layer.training else layer.max_voxels[1]
    feats, coords, sizes = [], [], []
    for k, points in enumerate(batch_inputs_dict["points"]):
        f, c, n = hard_voxelize(points.float(), layer.voxel_size, layer.point_cloud_range, layer.max_num_points, max_voxels)
        # spconv's SparseSequential branches on a non-empty site count
        torch._check(f.shape[0] >= 1, lambda: "no point in the voxel grid")
        feats.append(f)
        coords.append(F.pad(c.flip(1), (1, 0), mode="constant", value=k))
        sizes.append(n)
    feats, coords, sizes = torch.cat(feats, dim=0), torch.cat(coords, dim=0), torch.cat(sizes, dim=0)
    if self.voxelize_reduce:
        feats = (feats.sum(dim=1, keepdim=False) / sizes.type_as(feats).view(-1, 1)).contiguous()
    return self.pts_middle_encoder(feats, coords, static_batch_size())


def top_k_by_score(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest of ``scores`` ``[B, n]`` (values in ``[0, 1]``), by score, then
    by lower index: one ``TopK`` over unique int64 keys ``score * 2**s`` (an exact integer for
    scores >= 2**(23 - s), s = 61 - index bits: 2**-19 for BEVFusion's 324,000 cells) shifted
    left by the index bits, plus the reversed index.

    The original ``argsort(descending=True)`` leaves the order of equal scores to the sort
    implementation (CPU and CUDA differ; neither is stable here), and with random weights most of
    the 200 selected scores are ties (the constant heatmap of empty BEV cells: 7 distinct values
    on the nuScenes frame); a plain ``topk`` has no tie rule either. Scores below the exact range
    are ordered by their truncated key (a tie there goes to the lower index)."""
    forced = _FORCED_QUERIES.get()
    if forced is not None:  # validation: the queries another runtime selected (reselect_queries)
        return forced.to(scores.device)
    n = scores.shape[-1]
    bits = max(int(n - 1).bit_length(), 1)
    code = (scores * float(2 ** (61 - bits))).to(torch.int64)
    index = torch.cumsum(torch.ones_like(code), -1) - 1  # an iota (cf. ops.voxelize._iota)
    key = code * (1 << bits) + ((1 << bits) - 1 - index)
    return top_k_keys(key, k)  # one TopK; in IREE exports, a selection first


@register(
    "transfusion.topk",
    f"{BEVFUSION}.transfusion_head:TransFusionHead.forward_single",
    "argsort of the whole heatmap, integer // and %, in-place slice writes",
)
def transfusion_forward_single(self, inputs: Tensor, metas):
    """``TransFusionHead.forward_single`` (mmdet3d 1.4.0 BEVFusion) with an export-friendly query
    selection, same results:

    * local maxima: the inner ``max_pool2d`` zero-padded (the original writes it into a zero
      tensor's interior), the per-class kernel-1 pools (identity) selected by class;
    * the top ``num_proposals`` of the flattened heatmap by ``top_k_by_score`` (ONNX TopK) instead
      of a full ``argsort``: the same scores, with a fixed rule for ties (the original has none);
    * the class of a flat index by counting the class boundaries below it, the cell as
      ``index - class * cells`` (no integer division).
    """
    batch_size = inputs.shape[0]
    fusion_feat = self.shared_conv(inputs)
    fusion_feat_flatten = fusion_feat.view(batch_size, fusion_feat.shape[1], -1)
    bev_pos = self.bev_pos.repeat(batch_size, 1, 1).to(fusion_feat.device)

    dense_heatmap = self.heatmap_head(fusion_feat.float())
    heatmap = dense_heatmap.detach().sigmoid()
    padding = self.nms_kernel_size // 2
    local_max_inner = F.max_pool2d(heatmap, kernel_size=self.nms_kernel_size, stride=1, padding=0)
    local_max = F.pad(local_max_inner, (padding, padding, padding, padding)) if padding else local_max_inner
    identity_classes = _identity_classes(self)
    if identity_classes:  # Pedestrian & Traffic_cone (nuScenes), Pedestrian & Cyclist (Waymo)
        is_identity = torch.zeros(heatmap.shape[1], dtype=torch.bool, device=heatmap.device)
        is_identity[list(identity_classes)] = True
        local_max = torch.where(is_identity.view(1, -1, 1, 1), heatmap, local_max)
    heatmap = heatmap * (heatmap == local_max)
    heatmap = heatmap.view(batch_size, heatmap.shape[1], -1)

    cells = heatmap.shape[-1]
    top_proposals = top_k_by_score(heatmap.view(batch_size, -1), self.num_proposals)
    bounds = torch.arange(1, heatmap.shape[1], device=heatmap.device, dtype=top_proposals.dtype) * cells
    top_proposals_class = (top_proposals.unsqueeze(-1) >= bounds).sum(-1)
    top_proposals_index = top_proposals - top_proposals_class * cells
    query_feat = fusion_feat_flatten.gather(
        index=top_proposals_index[:, None, :].expand(-1, fusion_feat_flatten.shape[1], -1), dim=-1
    )
    self.query_labels = top_proposals_class
    self.query_index = top_proposals  # read (and removed) by head_outputs

    one_hot = F.one_hot(top_proposals_class, num_classes=self.num_classes).permute(0, 2, 1)
    query_feat = query_feat + self.class_encoding(one_hot.float())
    query_pos = bev_pos.gather(
        index=top_proposals_index[:, None, :].permute(0, 2, 1).expand(-1, -1, bev_pos.shape[-1]), dim=1
    )

    ret_dicts = []
    for i in range(self.num_decoder_layers):
        query_feat = self.decoder[i](query_feat, key=fusion_feat_flatten, query_pos=query_pos, key_pos=bev_pos)
        res_layer = self.prediction_heads[i](query_feat)
        res_layer["center"] = res_layer["center"] + query_pos.permute(0, 2, 1)
        ret_dicts.append(res_layer)
        query_pos = res_layer["center"].detach().clone().permute(0, 2, 1)

    ret_dicts[0]["query_heatmap_score"] = heatmap.gather(
        index=top_proposals_index[:, None, :].expand(-1, self.num_classes, -1), dim=-1
    )
    ret_dicts[0]["dense_heatmap"] = dense_heatmap
    if self.auxiliary is False:
        return [ret_dicts[-1]]
    new_res = {}
    for key in ret_dicts[0].keys():
        if key not in ["dense_heatmap", "dense_heatmap_old", "query_heatmap_score"]:
            new_res[key] = torch.cat([ret_dict[key] for ret_dict in ret_dicts], dim=-1)
        else:
            new_res[key] = ret_dicts[0][key]
    return [new_res]


# ------------------------------------------------------------------------------ camera branch


def inverse3x3(m: Tensor) -> Tensor:
    """Inverse of ``[..., 3, 3]`` matrices by cofactors (``torch.inverse`` has no ONNX
    translation). Equal to ``torch.inverse`` up to float32 rounding (a few ulp); exact for the
    identity and for the diagonal scalings of the image augmentation."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    co = torch.stack(
        [
            torch.stack([e * i - f * h, c * h - b * i, b * f - c * e], -1),
            torch.stack([f * g - d * i, a * i - c * g, c * d - a * f], -1),
            torch.stack([d * h - e * g, b * g - a * h, a * e - b * d], -1),
        ],
        -2,
    )
    det = a * co[..., 0, 0] + b * co[..., 1, 0] + c * co[..., 2, 0]
    return co / det[..., None, None]


def _stack_metas(metas: list[dict], key: str, like: Tensor) -> Tensor:
    """``[B, ...]`` of one camera matrix from the tensor metas (the original converts NumPy
    arrays with ``imgs.new_tensor``; absent augmentation matrices are the identity as there)."""
    if all(key in m for m in metas):
        return torch.stack([torch.as_tensor(m[key]).to(like) for m in metas])
    if key in DEFAULT_EYE:
        return like.new_tensor(np.asarray([np.eye(4) for _ in metas]))
    raise KeyError(f"BEVFusion needs the camera matrix {key!r} of every sample")


@register(
    "bevfusion.extract_feat",
    f"{BEVFUSION}.bevfusion:BEVFusion.extract_feat",
    "camera matrices go through NumPy (np.asarray of the metainfo), points through deepcopy",
)
def extract_feat(self, batch_inputs_dict, batch_input_metas, **kwargs):
    """``BEVFusion.extract_feat`` with the camera matrices stacked as tensors (from the tensor
    metas of ``batch_metas``). The points are not copied: the patched view transform does not
    write into them (the original's does, hence its ``deepcopy``)."""
    imgs = batch_inputs_dict.get("imgs", None)
    points = batch_inputs_dict.get("points", None)
    features = []
    if imgs is not None:
        imgs = imgs.contiguous()
        mats = {key: _stack_metas(batch_input_metas, key, imgs) for key in CAMERA_KEYS}
        img_feature = self.extract_img_feat(
            imgs,
            points,
            mats["lidar2img"],
            mats["cam2img"],
            mats["cam2lidar"],
            mats["img_aug_matrix"],
            mats["lidar_aug_matrix"],
            batch_input_metas,
        )
        features.append(img_feature)
    features.append(self.extract_pts_feat(batch_inputs_dict))
    if self.fusion_layer is not None:
        x = self.fusion_layer(features)
    else:
        assert len(features) == 1, features
        x = features[0]
    x = self.pts_backbone(x)
    return self.pts_neck(x)


def _last_write(cell: Tensor, values: Tensor, size: int) -> Tensor:
    """``out = zeros(size); out[cell] = values`` with the serial rule for repeated cells (the last
    write wins, as the original's ``index_put`` on one thread), for rows with ``0 <= cell < size``;
    other rows are dropped.

    A max-reducing scatter of the row numbers finds each cell's last row; only that row writes,
    every other row goes to a discarded dump slot, so the scatter has no repeated index where it
    matters (ONNX ScatterND leaves the order of repeated indices unspecified). Linear in the
    rows, no sort: a sort of ``cell * N + row`` took this place, and IREE 3.13 sorts in O(n^2)
    (the camera model's ~200k projected points did not finish a validation in 15 min)."""
    row = _iota(cell)
    cell = torch.where((cell >= 0) & (cell < size), cell, torch.full_like(cell, size))
    last = torch.full((size + 1,), -1, dtype=row.dtype, device=row.device).scatter_reduce(0, cell, row, "amax")
    target = torch.where(last.index_select(0, cell) == row, cell, torch.full_like(cell, size))
    out = values.new_zeros(size + 1)
    return out.index_put((target,), values)[:size]


def lidar_depth(self, points: list[Tensor], lidar2image: Tensor, img_aug_matrix: Tensor, lidar_aug_matrix: Tensor, num_cams: int) -> Tensor:
    """The sparse lidar depth image ``[B, cams, 1, H, W]`` of ``BaseDepthTransform.forward``.

    Same float ops in the same order as the original per-sample loop; the per-camera boolean
    masks become one "last write wins" scatter over all cameras (``_last_write``). The original
    keeps ``dist`` as a view of the row it then clamps, so the depth written is the clamped one."""
    h, w = self.image_size
    depth = []
    for b in range(len(points)):
        cur_coords = points[b][:, :3] - lidar_aug_matrix[b][:3, 3]
        cur_coords = inverse3x3(lidar_aug_matrix[b][:3, :3]).matmul(cur_coords.transpose(1, 0))
        cur_coords = lidar2image[b][:, :3, :3].matmul(cur_coords)
        cur_coords = cur_coords + lidar2image[b][:, :3, 3].reshape(-1, 3, 1)
        dist = torch.clamp(cur_coords[:, 2, :], 1e-5, 1e5)
        cur_coords = torch.cat([cur_coords[:, :2, :] / dist[:, None, :], dist[:, None, :]], dim=1)
        cur_coords = img_aug_matrix[b][:, :3, :3].matmul(cur_coords)
        cur_coords = cur_coords + img_aug_matrix[b][:, :3, 3].reshape(-1, 3, 1)
        cur_coords = cur_coords[:, :2, :].transpose(1, 2)
        row, col = cur_coords[..., 1], cur_coords[..., 0]
        on_img = (row < h) & (row >= 0) & (col < w) & (col >= 0)
        # .long() of the (non-negative) on-image coordinates; off-image ones never index
        row = torch.where(on_img, row, torch.zeros_like(row)).long()
        col = torch.where(on_img, col, torch.zeros_like(col)).long()
        cam = _iota(row[:, 0])[:, None]
        cell = (cam * h + row) * w + col
        cell = torch.where(on_img, cell, torch.full_like(cell, -1))
        depth.append(_last_write(cell.reshape(-1), dist.reshape(-1), num_cams * h * w).view(num_cams, 1, h, w))
    return torch.stack(depth)


def _apply3x3(m: Tensor, points: Tensor) -> Tensor:
    """``m.view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)`` for ``m [B, N, 3,
    3]`` and ``points [B, N, D, H, W, 3]``, as three broadcast multiply-adds in the matmul's order
    (``0 + m[i, 0] p[0] + m[i, 1] p[1] + m[i, 2] p[2]``). An ONNX MatMul over 2M points with 3x3
    matrices runs one tiny GEMM per point in onnxruntime: 0.4 s each on one thread, three of them
    per frame."""
    B, N = m.shape[:2]
    cols = m.view(B, N, 1, 1, 1, 3, 3)
    return cols[..., 0] * points[..., 0:1] + cols[..., 1] * points[..., 1:2] + cols[..., 2] * points[..., 2:3]


def get_geometry(self, camera2lidar_rots, camera2lidar_trans, intrins, post_rots, post_trans, extra_rots, extra_trans):
    """``BaseViewTransform.get_geometry`` (frustum -> lidar frame) with ``inverse3x3`` for
    ``torch.inverse``, the per-point 3x3 products as multiply-adds (``_apply3x3``) and without
    in-place adds."""
    B, N, _ = camera2lidar_trans.shape
    points = self.frustum - post_trans.view(B, N, 1, 1, 1, 3)
    points = _apply3x3(inverse3x3(post_rots), points)
    points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:3]), 5)
    combine = camera2lidar_rots.matmul(inverse3x3(intrins))
    points = _apply3x3(combine, points)
    points = points + camera2lidar_trans.view(B, N, 1, 1, 1, 3)
    points = _apply3x3(extra_rots.view(B, 1, 3, 3).expand(B, N, 3, 3), points)
    return points + extra_trans.view(B, 1, 1, 1, 1, 3).repeat(1, N, 1, 1, 1, 1)


@register(
    "depth_lss.forward",
    f"{BEVFUSION}.depth_lss:BaseDepthTransform.forward",
    "per-camera boolean masks (data-dependent shapes), torch.inverse (no ONNX translation), in-place writes",
)
def base_depth_transform_forward(
    self, img, points, lidar2image, cam_intrinsic, camera2lidar, img_aug_matrix, lidar_aug_matrix, metas, **kwargs
):
    depth = lidar_depth(self, points, lidar2image, img_aug_matrix, lidar_aug_matrix, img.shape[1])
    geom = get_geometry(
        self,
        camera2lidar[..., :3, :3],
        camera2lidar[..., :3, 3],
        cam_intrinsic[..., :3, :3],
        img_aug_matrix[..., :3, :3],
        img_aug_matrix[..., :3, 3],
        lidar_aug_matrix[..., :3, :3],
        lidar_aug_matrix[..., :3, 3],
    )
    x = self.get_cam_feats(img, depth)
    return self.bev_pool(geom, x)


@register(
    "depth_lss.cam_feats",
    f"{BEVFUSION}.depth_lss:DepthLSSTransform.get_cam_feats",
    "builds the depth x feature outer product channel-first, then permutes it: a 640 MB transpose per frame",
)
def depth_lss_get_cam_feats(self, x: Tensor, d: Tensor) -> Tensor:
    """``DepthLSSTransform.get_cam_feats`` with the outer product of depth probabilities and
    context features formed in the output's ``[B, N, D, fH, fW, C]`` order (the features are
    permuted before it, 80 x 32 x 88 per camera, not after, 118 times as many values). The same
    products, so bit-identical; onnxruntime, one thread: Transpose 335 ms + Mul 120 ms -> one Mul."""
    B, N, C, fH, fW = x.shape
    d = d.view(B * N, *d.shape[2:])
    x = x.view(B * N, C, fH, fW)
    d = self.dtransform(d)
    x = torch.cat([d, x], dim=1)
    x = self.depthnet(x)
    depth = x[:, : self.D].softmax(dim=1)
    feats = x[:, self.D : (self.D + self.C)].permute(0, 2, 3, 1).contiguous()
    out = depth.unsqueeze(-1) * feats.unsqueeze(1)  # [BN, D, fH, fW, 1] * [BN, 1, fH, fW, C]
    return out.view(B, N, self.D, fH, fW, self.C)


@register(
    "lss.bev_pool",
    f"{BEVFUSION}.depth_lss:BaseViewTransform.bev_pool",
    "boolean-mask filtering, argsort and the compiled bev_pool kernel",
)
def base_view_transform_bev_pool(self, geom_feats: Tensor, x: Tensor) -> Tensor:
    """``codegen.ops.bev_pool.lss_bev_pool``: bit-exact with BEVFusion's (CUDA sums each cell's
    points in input order, as a stable sort leaves them)."""
    return lss_bev_pool(geom_feats, x, self.xbound, self.ybound, self.zbound)
