"""Patches for dynamic-voxelization detectors (``DynamicVoxelNet``: PointPillars-DV, SECOND-DV).

With ``voxel_type='dynamic'`` the data_preprocessor hands the model per-point tensors: ``voxels``
``[N, C]`` (the points themselves) and ``coors`` ``[N, 4]`` (batch, z, y, x; ``-1`` rows for
points outside the grid). Three things stop the original from exporting (or running on a CPU):

* ``mmcv.ops.DynamicScatter`` (points -> voxels) has no CPU kernel in mmcv 2.1.0, and its voxel
  count ``M`` is data-dependent;
* the encoders' ``map_voxel_center_to_point`` sizes a canvas from ``pts_coors[-1, 0] + 1``;
* ``DynamicVoxelNet.extract_feat`` reads the batch size with ``coors[-1, 0].item() + 1``.

**Padded form.** The patched encoders use ``codegen.ops.dynamic_scatter.dynamic_scatter_padded``
and return ``N`` rows (one per point: the most voxels there can be): rows ``0 .. M-1`` are the
voxels in mmcv's order (coordinates sorted lexicographically), the rest are padding with zero
features and coordinates ``-1``. Per-point lookups of voxel values gather with ``point2voxel``
instead of going through a canvas, so the encoder graph has no size but ``N``. The middle
encoders ignore the ``-1`` rows: ``pillar_scatter.padded`` routes them to a dump row of the BEV
canvas; ``sparse_encoder.padded`` keeps the first ``M`` rows (its sparse convolutions have
data-dependent site counts anyway). The recipe installs these two in place of the hard-voxel
component patches (``pillar_scatter.vectorized`` / the plain ``SparseEncoder``), which would
treat the padding rows as voxels.

``dynamic_scatter.torch`` swaps mmcv's ``DynamicScatter.forward`` itself for the pure-torch op
(same outputs as mmcv's CUDA kernel): the original encoder code then runs on a CPU unchanged,
which is how the tests compare the padded forwards with mmdet3d's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.dynamic_scatter import Groups, dynamic_scatter, dynamic_scatter_padded, grid_of, group_points
from ..ops.scatter import BevConv, scatter_conv_to_bev, scatter_to_bev
from ..ops.voxelize import _iota
from .voxelnet import dense_tail
from . import known_batch_size, register, static_batch_size

# max reduction of DynamicScatter: "scatter" (ScatterElements max; IREE's copy gets a ScatterND
# max, graph_forms.row_max_scatters_as_scatter_nd) or "sort" (two sorts, no max-scatter: 109 ms
# more in onnxruntime on PointPillars-DV, and O(n^2) in IREE); both equal mmcv
MAX_IMPL = "scatter"


def _reduce(scatter_module) -> str:
    """mmcv ``DynamicScatter``'s reduction: mean if it averages points, else max."""
    return "mean" if scatter_module.average_points else "max"


def _grid(scatter_module, coors: Tensor) -> list[int] | None:
    """The extents of ``coors``' columns under the module's voxel grid (``None``: unknown)."""
    grid = grid_of(scatter_module.voxel_size, scatter_module.point_cloud_range)
    if coors.shape[1] == 4:  # (batch, z, y, x): the batch size bounds the first column
        batch = known_batch_size()
        grid = [batch] + grid if batch is not None else None  # unknown: group by sorting
    return grid


def _scatter(
    feats: Tensor, coors: Tensor, scatter_module, reduce: str | None = None, groups: Groups | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(voxel features [N, C], voxel coors [N, D], point2voxel [N], num_voxels []): padded.
    The module's grid lets small grids (pillars) group the points by counting, without a sort;
    ``groups`` (``_shared_groups``) reuses a grouping of the same coors."""
    reduce = reduce or _reduce(scatter_module)
    return dynamic_scatter_padded(feats, coors, reduce, MAX_IMPL, _grid(scatter_module, coors), groups)


def _shared_groups(self, scatter_name: str, coors: Tensor) -> Groups | None:
    """One grouping of ``coors`` for the encoder's cluster mean and its ``scatter_name`` max (the
    original groups the same points in each DynamicScatter call; exported, each grouping is a
    scatter, a CumSum over the grid and gathers: ~2 ms of PointPillars-DV in onnxruntime, two
    threads). ``None`` when the two scatters' grids differ or there is no cluster mean."""
    cluster = getattr(self, "cluster_scatter", None) if self._with_cluster_center else None
    scatter = getattr(self, scatter_name)
    if cluster is None or any(list(getattr(cluster, a)) != list(getattr(scatter, a)) for a in ("voxel_size", "point_cloud_range")):
        return None
    return group_points(coors, _grid(scatter, coors), _reduce(scatter), MAX_IMPL)


def _per_point(voxel_feats: Tensor, point2voxel: Tensor) -> Tensor:
    """Each point's voxel row (what the original reads back through its canvas). Points with
    invalid coors (``point2voxel == -1``) get row 0: their values never reach a voxel."""
    return voxel_feats.index_select(0, point2voxel.clamp(min=0))


def _mark_padding(voxel_coors: Tensor, num_voxels: Tensor) -> Tensor:
    """Coordinates ``-1`` on the padding rows (``row >= num_voxels``): the rows to ignore."""
    is_voxel = (_iota(voxel_coors[:, 0]) < num_voxels)[:, None]
    return torch.where(is_voxel, voxel_coors, torch.full_like(voxel_coors, -1))


def _voxel_center_offsets(self, features: Tensor, coors: Tensor) -> Tensor:
    """x, y, z of each point minus its voxel centre: the original's ``f_center`` (same
    expressions, without writing into a zero tensor)."""
    return torch.stack(
        [
            features[:, 0] - (coors[:, 3].type_as(features) * self.vx + self.x_offset),
            features[:, 1] - (coors[:, 2].type_as(features) * self.vy + self.y_offset),
            features[:, 2] - (coors[:, 1].type_as(features) * self.vz + self.z_offset),
        ],
        dim=1,
    )


def _decorations(self, features: Tensor, coors: Tensor, groups: Groups | None = None) -> Tensor:
    """The point decorations of DynamicPillarFeatureNet / DynamicVFE: cluster offsets (point
    minus its voxel's mean), voxel-centre offsets, distance; concatenated after the point."""
    features_ls = [features]
    if self._with_cluster_center:
        # per channel the mean of the first three channels equals theirs in the full-width mean
        means = _scatter(features[:, :3].contiguous(), coors, self.cluster_scatter, "mean", groups)
        voxel_mean, point2voxel = means[0], means[2]
        features_ls.append(features[:, :3] - _per_point(voxel_mean, point2voxel))
    if self._with_voxel_center:
        features_ls.append(_voxel_center_offsets(self, features, coors))
    if self._with_distance:
        features_ls.append(torch.norm(features[:, :3], 2, 1, keepdim=True))
    return torch.cat(features_ls, dim=-1)


@register(
    "dynamic_voxelnet.static_batch_size",
    "mmdet3d.models.detectors.dynamic_voxelnet:DynamicVoxelNet.extract_feat",
    "batch size is coors[-1, 0].item() + 1: data-dependent, breaks torch.export",
)
def dynamic_voxelnet_extract_feat(self, batch_inputs_dict: dict):
    voxel_dict = batch_inputs_dict["voxels"]
    voxel_features, feature_coors = self.voxel_encoder(voxel_dict["voxels"], voxel_dict["coors"])
    return dense_tail(self, voxel_features, feature_coors)


@register(
    "dynamic_scatter.torch",
    "mmcv.ops.scatter_points:DynamicScatter.forward",
    "no CPU kernel in mmcv 2.1.0; pure-torch op with the CUDA kernel's results (M data-dependent)",
)
def dynamic_scatter_forward(self, points: Tensor, coors: Tensor) -> tuple[Tensor, Tensor]:
    # four-column coors in one pass: lexicographic order with the batch first is mmcv's
    # per-sample loop + concatenation
    return dynamic_scatter(points, coors, _reduce(self), MAX_IMPL)


@register(
    "dynamic_pillar_feature_net.padded",
    "mmdet3d.models.voxel_encoders.pillar_encoder:DynamicPillarFeatureNet.forward",
    "DynamicScatter (no CPU kernel, M voxels) and a canvas sized from coors[-1, 0] + 1",
)
def dynamic_pillar_feature_net_forward(self, features: Tensor, coors: Tensor) -> tuple[Tensor, Tensor]:
    """DynamicPillarFeatureNet.forward in the padded form: ``[N, C]`` pillar features and
    ``[N, 4]`` pillar coors, the first ``M`` rows as the original's, the rest padding (-1)."""
    groups = _shared_groups(self, "pfn_scatter", coors)
    features = _decorations(self, features, coors, groups)
    for i, pfn in enumerate(self.pfn_layers):
        point_feats = pfn(features)
        voxel_feats, voxel_coors, point2voxel, num_voxels = _scatter(point_feats, coors, self.pfn_scatter, groups=groups)
        if i != len(self.pfn_layers) - 1:
            features = torch.cat([point_feats, _per_point(voxel_feats, point2voxel)], dim=1)
    return voxel_feats, _mark_padding(voxel_coors, num_voxels)


@register(
    "dynamic_vfe.padded",
    "mmdet3d.models.voxel_encoders.voxel_encoder:DynamicVFE.forward",
    "DynamicScatter (no CPU kernel, M voxels) and a canvas sized from coors[-1, 0] + 1",
)
def dynamic_vfe_forward(
    self, features: Tensor, coors: Tensor, points=None, img_feats=None, img_metas=None, *args, **kwargs
):
    """DynamicVFE.forward in the padded form (see ``dynamic_pillar_feature_net_forward``)."""
    groups = _shared_groups(self, "vfe_scatter", coors)
    features = _decorations(self, features, coors, groups)
    for i, vfe in enumerate(self.vfe_layers):
        point_feats = vfe(features)
        if i == len(self.vfe_layers) - 1 and self.fusion_layer is not None and img_feats is not None:
            point_feats = self.fusion_layer(img_feats, points, point_feats, img_metas)
        voxel_feats, voxel_coors, point2voxel, num_voxels = _scatter(point_feats, coors, self.vfe_scatter, groups=groups)
        if i != len(self.vfe_layers) - 1:
            features = torch.cat([point_feats, _per_point(voxel_feats, point2voxel)], dim=1)
    if self.return_point_feats:
        return point_feats
    return voxel_feats, _mark_padding(voxel_coors, num_voxels)


@register(
    "dynamic_simple_vfe.padded",
    "mmdet3d.models.voxel_encoders.voxel_encoder:DynamicSimpleVFE.forward",
    "DynamicScatter: no CPU kernel, M voxels",
)
def dynamic_simple_vfe_forward(self, features: Tensor, coors: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """DynamicSimpleVFE.forward (mean of the points of each voxel) in the padded form.
    (The original runs under ``torch.no_grad()``; export runs without gradients anyway.)"""
    voxel_feats, voxel_coors, _, num_voxels = _scatter(features, coors, self.scatter)
    return voxel_feats, _mark_padding(voxel_coors, num_voxels)


def _leading_rows(coors: Tensor, minimum: int) -> int:
    """``M``, the rows before the padding (the padded encoders put the voxels first, padding rows
    have coors -1), as an unbacked size with its bounds (at least ``minimum``, at most the rows)."""
    m = (coors[:, 0] >= 0).sum().item()
    torch._check(m >= minimum, lambda: "no voxel in range")
    torch._check(m <= coors.shape[0])
    return m


@register(
    "pillar_scatter.padded",
    "mmdet3d.models.middle_encoders.pillar_scatter:PointPillarsScatter.forward",
    "padded pillar rows (coors -1) must not reach the canvas; per-sample loop as in .vectorized",
)
def pillars_scatter_padded_forward(
    self, voxel_features: Tensor, coors: Tensor, batch_size=None, first_layer: BevConv | None = None
) -> Tensor:
    """With the backbone's first layer (``voxelnet.dense_tail``), that conv applied to the pillar
    rows (``scatter_conv_to_bev``) on the first ``M`` rows, the pillars (one more unbacked size,
    as in ``sparse_encoder.padded``): onnxruntime then skips the canvas, its reorder and the dense
    stride-2 conv on PointPillars-DV (~54 ms of 765 on one thread). On all ``N`` rows (one per
    point) the rows' products cost more than the canvas."""
    if first_layer is None:
        return scatter_to_bev(voxel_features, coors, static_batch_size(), self.ny, self.nx, valid=coors[:, 0] >= 0)
    m = _leading_rows(coors, minimum=0)
    return scatter_conv_to_bev(voxel_features[:m], coors[:m], static_batch_size(), self.ny, self.nx, first_layer)


@register(
    "sparse_encoder.padded",
    "mmdet3d.models.middle_encoders.sparse_encoder:SparseEncoder.forward",
    "padded voxel rows (coors -1) must not become sparse sites",
)
def sparse_encoder_padded_forward(self, voxel_features: Tensor, coors: Tensor, batch_size: int):
    """SparseEncoder.forward (mmdet3d 1.4.0) on the voxel rows only.

    The padded encoders put the ``M`` voxels first; the sparse convolutions' site counts are
    data-dependent from the first strided layer on, so the voxel count enters here as one more
    (unbacked) size instead of routing padding rows through every layer."""
    from mmdet3d.models.middle_encoders.sparse_encoder import SparseConvTensor  # spconv's or mmcv's

    m = _leading_rows(coors, minimum=1)
    voxel_features, coors = voxel_features[:m], coors[:m].int()
    input_sp_tensor = SparseConvTensor(voxel_features, coors, self.sparse_shape, batch_size)
    x = self.conv_input(input_sp_tensor)
    encode_features = []
    for encoder_layer in self.encoder_layers:
        x = encoder_layer(x)
        encode_features.append(x)
    out = self.conv_out(encode_features[-1])
    spatial_features = out.dense()
    n, c, d, h, w = spatial_features.shape
    spatial_features = spatial_features.view(n, c * d, h, w)
    if self.return_middle_feats:
        return spatial_features, encode_features
    return spatial_features
