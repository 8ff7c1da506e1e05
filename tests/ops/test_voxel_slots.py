"""Voxel encoders by point-count groups (codegen/ops/voxel_slots.py, patches.voxelnet.encode_voxels):
equal to mmdet3d's encoder on all slots, on the real KITTI and nuScenes frames, and exported with
empty groups."""

from __future__ import annotations

import pytest
import torch
from export_check import assert_exports

from codegen import patches, sample
from codegen.ops.voxel_slots import encode_by_point_count, slot_limits
from codegen.patches.voxelnet import encode_voxels
from conftest import frame_path

MODELS = {
    # config, dataset, encoder attribute, patches its recipe puts on the encoder
    "pointpillars-kitti": ("pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car", "KittiDataset", "voxel_encoder"),
    "pointpillars-nus-hardvfe": ("pointpillars_hv_fpn_sbn-all_8xb4-2x_nus-3d", "NuScenesDataset", "pts_voxel_encoder"),
}
ENCODER_PATCHES = ("pillar_feature_net.functional",)


def _randomise_norms(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


_LOADED: dict = {}


def _load(name: str):
    if name not in _LOADED:
        _LOADED[name] = _encoder_and_voxels(*MODELS[name])
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(MODELS))
def encoder_and_voxels(request):
    return _load(request.param)


def _encoder_and_voxels(config: str, dataset: str, attr: str):
    frame_path(dataset)
    model = sample.load_model(config)
    encoder = getattr(model, attr)
    _randomise_norms(encoder)
    voxels = sample.sample_frame(model, sample.default_frame_ref(model.cfg), 0).data["inputs"]["voxels"]
    return encoder, voxels["voxels"], voxels["num_points"], voxels["coors"]


def test_groups_equal_the_encoder_on_all_slots(encoder_and_voxels):
    encoder, voxels, num_points, coors = encoder_and_voxels
    slots = voxels.shape[1]
    limits = slot_limits(slots)
    assert limits[-1] == slots and len(limits) == 3
    # the frame fills few slots, and every group has voxels
    assert num_points.sum() < 0.2 * num_points.numel() * slots
    assert all(((num_points >= lo) & (num_points < hi)).any() for lo, hi in zip((0,) + limits, limits))
    with torch.no_grad(), patches.applied(ENCODER_PATCHES):
        expected = encoder(voxels.clone(), num_points, coors)
        grouped = encode_voxels(encoder, voxels.clone(), num_points, coors)
    assert grouped.shape == expected.shape
    torch.testing.assert_close(grouped, expected, rtol=1e-6, atol=1e-6)


def test_pfn_average_pooling_is_not_grouped():
    """An average over all slots counts the padding: groups would change it, so encode_voxels
    leaves such an encoder alone (KITTI's voxels, PointPillars' grid)."""
    from mmdet3d.models.voxel_encoders import PillarFeatureNet

    _, voxels, num_points, coors = _load("pointpillars-kitti")
    torch.manual_seed(0)
    grid = dict(voxel_size=(0.16, 0.16, 4), point_cloud_range=(0, -39.68, -3, 69.12, 39.68, 1))
    avg = PillarFeatureNet(4, (64,), mode="avg", **grid).eval()
    _randomise_norms(avg)
    with torch.no_grad(), patches.applied(ENCODER_PATCHES):
        expected = avg(voxels.clone(), num_points, coors)
        grouped = encode_by_point_count(avg, voxels.clone(), num_points, coors, slot_limits(voxels.shape[1]))
        assert not torch.allclose(grouped, expected, atol=1e-4)
        torch.testing.assert_close(encode_voxels(avg, voxels.clone(), num_points, coors), expected, rtol=0, atol=0)


class _Grouped(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, voxels, num_points, coors):
        return encode_by_point_count(self.encoder, voxels, num_points, coors, slot_limits(voxels.shape[1]))


def test_groups_export_with_empty_groups(encoder_and_voxels, tmp_path):
    """PT2 and onnxruntime equal eager on the frame's voxels and on a subset whose voxels all
    hold fewer points than the first limit (the other groups empty)."""
    encoder, voxels, num_points, coors = encoder_and_voxels
    few = (num_points < slot_limits(voxels.shape[1])[0]).nonzero()[:, 0][:500]
    assert len(few) == 500
    inputs = [(voxels, num_points, coors), (voxels[few], num_points[few], coors[few])]
    v = torch.export.Dim("v", min=2)
    with patches.applied(ENCODER_PATCHES):
        assert_exports(_Grouped(encoder), inputs, ({0: v}, {0: v}, {0: v}), tmp_path, atol=1e-5)
