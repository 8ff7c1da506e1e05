"""codegen.ops.points' stacked ball query / grouping (PV-RCNN) against readable references of mmcv's
CUDA-only kernels (``stack_ball_query_cuda_kernel.cuh``, ``stack_group_points_cuda_kernel.cuh``),
on the real KITTI frame: two clouds stacked with batch counts, PV-RCNN's radii and sample counts,
centres on the cloud (key points), on a voxel grid (voxel centres) and far away (empty balls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codegen.ops import points
from codegen.ops.points import stack_ball_query, stack_grouping_operation
from export_check import assert_exports, forbidden_onnx_ops

F32 = np.float32


def stack_ball_query_reference(radius, nsample, xyz, xyz_cnt, centers, centers_cnt) -> np.ndarray:
    """The kernel, one centre at a time: scan the centre's own cloud in order, take points with
    ``d2 < radius^2`` (float32, summed left to right), the first ``nsample``; free slots repeat
    the first hit, indices relative to the cloud; no hit -> ``[-1, 0, 0, ...]``."""
    r2 = F32(radius) * F32(radius)
    out = np.zeros((centers.shape[0], nsample), np.int32)
    starts, centre_starts = np.cumsum(xyz_cnt) - xyz_cnt, np.cumsum(centers_cnt) - centers_cnt
    for b in range(len(xyz_cnt)):
        cloud = xyz[starts[b] : starts[b] + xyz_cnt[b]]
        for m in range(centre_starts[b], centre_starts[b] + centers_cnt[b]):
            cx, cy, cz = centers[m]
            d2 = (
                (cx - cloud[:, 0]) * (cx - cloud[:, 0])
                + (cy - cloud[:, 1]) * (cy - cloud[:, 1])
                + (cz - cloud[:, 2]) * (cz - cloud[:, 2])
            )
            hits = np.flatnonzero(d2 < r2)[:nsample]
            if len(hits):
                out[m, :] = hits[0]
                out[m, : len(hits)] = hits
            else:
                out[m, 0] = -1
    return out


def stack_grouping_reference(features, features_cnt, idx, idx_cnt) -> np.ndarray:
    """``out[m, :, s] = features[start(b) + idx[m, s]]`` for the cloud ``b`` of row ``m``, zero for
    an index outside that cloud."""
    out = np.zeros((idx.shape[0], features.shape[1], idx.shape[1]), features.dtype)
    starts, row_starts = np.cumsum(features_cnt) - features_cnt, np.cumsum(idx_cnt) - idx_cnt
    for b in range(len(features_cnt)):
        for m in range(row_starts[b], row_starts[b] + idx_cnt[b]):
            for s, i in enumerate(idx[m]):
                if 0 <= i < features_cnt[b]:
                    out[m, :, s] = features[starts[b] + i]
    return out


def voxel_centres(points: np.ndarray, size=(0.1, 0.1, 0.2), low=(0.0, -40.0, -3.0)) -> np.ndarray:
    """Unique voxel centres of a cloud, as PV-RCNN's VoxelSetAbstraction computes them
    (``(coors + 0.5) * voxel_size + range_min``)."""
    size, low = np.asarray(size, F32), np.asarray(low, F32)
    coors = np.unique(np.floor((points[:, :3] - low) / size).astype(np.int64), axis=0)
    return ((coors.astype(F32) + F32(0.5)) * size + low).astype(F32)


@pytest.fixture(scope="module")
def stacked(kitti_points):
    """Two KITTI clouds stacked (the front half of the sweep and every third point of the
    whole sweep), with key points of each: cloud points, voxel centres and far-away centres."""
    rng = np.random.default_rng(0)
    front = kitti_points[kitti_points[:, 0] >= 0]
    clouds = [np.ascontiguousarray(front, F32), np.ascontiguousarray(kitti_points[::3], F32)]
    centres = []
    for c in clouds:
        on_cloud = c[rng.choice(len(c), 300, replace=False), :3]
        voxels = voxel_centres(c)[rng.choice(len(voxel_centres(c)), 200, replace=False)]
        far = np.array([[500.0, 500.0, 500.0], [-300.0, 20.0, 0.0]], F32)
        centres.append(np.concatenate([on_cloud, voxels, far]).astype(F32))
    return clouds, centres


def _stack(arrays):
    return np.ascontiguousarray(np.concatenate(arrays), F32), np.array([len(a) for a in arrays], np.int32)


@pytest.mark.parametrize("radius,nsample", [(0.4, 16), (0.8, 16), (2.4, 32), (4.8, 32)])
def test_stack_ball_query_kitti(stacked, radius, nsample):
    clouds, centres = stacked
    xyz, xyz_cnt = _stack([c[:, :3] for c in clouds])
    ctr, ctr_cnt = _stack(centres)
    got = stack_ball_query(
        radius, nsample, torch.from_numpy(xyz), torch.from_numpy(xyz_cnt), torch.from_numpy(ctr), torch.from_numpy(ctr_cnt)
    )
    assert got.dtype == torch.int32 and got.shape == (len(ctr), nsample)
    want = stack_ball_query_reference(radius, nsample, xyz, xyz_cnt, ctr, ctr_cnt)
    np.testing.assert_array_equal(got.numpy(), want)
    # the data exercise every case: empty balls, partly filled ones (padded), full ones,
    # and indices relative to the second cloud
    assert (want[:, 0] == -1).sum() >= 4
    assert ((want[:, -1] == want[:, 0]) & (want[:, 0] >= 0)).any()
    assert (np.diff(want, axis=1) > 0).all(1).any()
    assert want[ctr_cnt[0] :].max() < xyz_cnt[1]


@pytest.mark.parametrize("windowed", [True, False])
def test_stack_ball_query_one_cloud(stacked, monkeypatch, windowed):
    """PV-RCNN's case (batch size 1: the batch comparison is skipped), on the whole front half:
    windows of centres against x slabs of the points, and dense."""
    monkeypatch.setattr(points, "WINDOWED_QUERIES", windowed)
    monkeypatch.setattr(points, "WINDOWED_MIN_PAIRS", 1 << 20)
    clouds, centres = stacked
    xyz, xyz_cnt = _stack([clouds[0][:, :3]])
    ctr, ctr_cnt = _stack([centres[0]])
    args = [torch.from_numpy(a) for a in (xyz, xyz_cnt, ctr, ctr_cnt)]
    for radius in (0.8, 4.8):
        got = stack_ball_query(radius, 16, *args)
        want = stack_ball_query_reference(radius, 16, xyz, xyz_cnt, ctr, ctr_cnt)
        np.testing.assert_array_equal(got.numpy(), want)
        assert (want[:, 0] == -1).sum() >= 2 and (want[:, -1] > want[:, 0]).any()


def test_stack_ball_query_fewer_points_than_samples(stacked):
    """A cloud smaller than ``nsample`` (TopK needs the sentinel padding)."""
    clouds, centres = stacked
    xyz, xyz_cnt = _stack([clouds[0][:5, :3], clouds[1][:3000, :3]])
    ctr, ctr_cnt = _stack([np.concatenate([clouds[0][:5, :3], centres[0][-2:]]), centres[1][:50]])
    args = [torch.from_numpy(a) for a in (xyz, xyz_cnt, ctr, ctr_cnt)]
    got = stack_ball_query(10.0, 16, args[0], args[1], args[2], args[3])
    want = stack_ball_query_reference(10.0, 16, xyz, xyz_cnt, ctr, ctr_cnt)
    np.testing.assert_array_equal(got.numpy(), want)


def test_stack_grouping_kitti(stacked):
    """Grouping the intensity and xyz of both clouds with the ball query's indices (empty balls
    zeroed first, as ``StackQueryAndGroup`` does) and with out-of-cloud indices."""
    clouds, centres = stacked
    feats, feats_cnt = _stack(clouds)  # [N, 4]: x, y, z, intensity
    ctr, ctr_cnt = _stack(centres)
    idx = stack_ball_query_reference(0.8, 16, np.ascontiguousarray(feats[:, :3]), feats_cnt, ctr, ctr_cnt)
    idx[idx[:, 0] == -1] = 0
    idx[:7, 3] = [-1, -5, feats_cnt[0], feats_cnt[0] + 1, 10**6, 0, 1]  # outside the first cloud
    got = stack_grouping_operation(
        torch.from_numpy(feats), torch.from_numpy(feats_cnt), torch.from_numpy(idx), torch.from_numpy(ctr_cnt)
    )
    assert got.shape == (len(ctr), 4, 16)
    np.testing.assert_array_equal(got.numpy(), stack_grouping_reference(feats, feats_cnt, idx, ctr_cnt))


# ---------------------------------------------------------------------------------------------
# export (torch.export + ONNX, dynamic sizes), each op alone
# ---------------------------------------------------------------------------------------------


class Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b, c, d):
        return self.fn(a, b, c, d)


def _sized(stacked, n_points, n_centres):
    clouds, centres = stacked
    xyz, xyz_cnt = _stack([c[:n, :3] for c, n in zip(clouds, n_points)])
    ctr, ctr_cnt = _stack([c[:m] for c, m in zip(centres, n_centres)])
    return [torch.from_numpy(a) for a in (xyz, xyz_cnt, ctr, ctr_cnt)]


def test_export_stack_ball_query(stacked, tmp_path):
    inputs = [_sized(stacked, (3000, 2500), (150, 120)), _sized(stacked, (4100, 3900), (240, 200))]
    n, m = torch.export.Dim("n", min=2, max=200000), torch.export.Dim("m", min=2, max=100000)
    dims = ({0: n}, None, {0: m}, None)  # two clouds: the counts are [2]
    assert_exports(Op(lambda x, xc, c, cc: stack_ball_query(0.8, 16, x, xc, c, cc)), inputs, dims, tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []


def test_export_stack_grouping(stacked, tmp_path):
    inputs = []
    for n_points, n_centres in (((3000, 2500), (150, 120)), ((4100, 3900), (240, 200))):
        xyz, xyz_cnt, ctr, ctr_cnt = _sized(stacked, n_points, n_centres)
        idx = stack_ball_query(0.8, 16, xyz, xyz_cnt, ctr, ctr_cnt).clamp(min=0)
        feats = torch.cat([xyz, xyz.sum(1, keepdim=True)], 1)  # [N, 4]
        inputs.append((feats, xyz_cnt, idx, ctr_cnt))
    n, m = torch.export.Dim("n", min=2, max=200000), torch.export.Dim("m", min=2, max=100000)
    dims = ({0: n}, None, {0: m}, None)
    assert_exports(Op(stack_grouping_operation), inputs, dims, tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []
