"""Pure-torch BEVFusion bev_pool (codegen/ops/bev_pool.py) on real clouds, and each form exported
alone (PT2 reloaded + onnxruntime vs eager at two sizes).

The compiled ``bev_pool_ext`` CUDA op is not available, so the reference is a plain Python port of
``projects/BEVFusion/bevfusion/ops/bev_pool/bev_pool.py`` + ``src/bev_pool_cuda.cu``: ranks,
``argsort`` (stable, like the CUDA radix sort), intervals of equal rank, a sequential float32 sum per
interval written to ``out[b, z, x, y]``.  ``BaseViewTransform.bev_pool`` and ``gen_dx_bx`` are not
copied: their source is read from BEVFusion's ``depth_lss.py`` and executed as is, with only its
``bev_pool`` (the CUDA op) bound to that reference.

The frustum geometry is the real nuScenes LiDAR sweep (even / odd points as two batch samples)
reshaped to ``[B, N, D, H, W, 3]``; the features are seeded, signed and of widely varying magnitude so that a
different summation order gives different float32 sums (asserted).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_check import assert_exports, forbidden_onnx_ops

from codegen.ops.bev_pool import LSSBevPool, bev_pool, gen_dx_bx, lss_bev_pool

DEPTH_LSS = (
    Path(__file__).resolve().parents[2].parent
    / "shared/third_party/mmdetection3d/projects/BEVFusion/bevfusion/depth_lss.py"
)
NUS_BOUNDS = dict(xbound=[-54.0, 54.0, 0.3], ybound=[-54.0, 54.0, 0.3], zbound=[-10.0, 10.0, 20.0])
MULTI_Z = dict(xbound=[-40.0, 40.0, 0.5], ybound=[-30.0, 30.0, 0.4], zbound=[-3.0, 3.0, 1.5])


def reference_bev_pool(feats, coords, B, D, H, W):
    """bev_pool.py + bev_pool_cuda.cu: sort by rank, one interval per distinct rank, psum = 0 then
    psum += x for each point of the interval (float32), out[b, z, x, y] = psum; [B, C, D, H, W]."""
    f, c = feats.numpy(), coords.numpy().astype(np.int64)
    B, D, H, W = int(B), int(D), int(H), int(W)
    ranks = c[:, 0] * (W * D * B) + c[:, 1] * (D * B) + c[:, 2] * B + c[:, 3]
    order = np.argsort(ranks, kind="stable")
    f, c, ranks = f[order], c[order], ranks[order]
    starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
    lengths = np.diff(np.r_[starts, len(ranks)])
    out = np.zeros((B, D, H, W, f.shape[1]), np.float32)
    for start, length in zip(starts, lengths):
        g = c[start]
        psum = np.zeros(f.shape[1], np.float32)
        for i in range(length):
            psum += f[start + i]
        out[g[3], g[2], g[0], g[1]] = psum
    return torch.from_numpy(out).permute(0, 4, 1, 2, 3).contiguous()


def _bevfusion_source(name: str) -> str:
    """The source of ``def name`` from BEVFusion's depth_lss.py (skip when absent)."""
    if not DEPTH_LSS.is_file():
        pytest.skip(f"BEVFusion source absent: {DEPTH_LSS}")
    lines = DEPTH_LSS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"def {name}("))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent
        ),
        len(lines),
    )
    return textwrap.dedent("\n".join(lines[start:end]))


class ReferenceViewTransform:
    """BEVFusion's own ``gen_dx_bx`` and ``BaseViewTransform.bev_pool`` (source executed from
    depth_lss.py), with ``bev_pool`` = the reference port above."""

    def __init__(self, xbound, ybound, zbound):
        module_globals = {"torch": torch, "bev_pool": reference_bev_pool}  # depth_lss.py's names
        defined: dict = {}
        exec(_bevfusion_source("gen_dx_bx"), module_globals, defined)
        exec(_bevfusion_source("bev_pool"), module_globals, defined)  # the method, as a function
        self.dx, self.bx, self.nx = defined["gen_dx_bx"](xbound, ybound, zbound)
        self._bev_pool = defined["bev_pool"]

    def bev_pool(self, geom_feats, x):
        return self._bev_pool(self, geom_feats, x)


def _frustum(nuscenes_points, cams=2, depth=3, rows=4, width=700, channels=8, seed=0):
    """geom [2, cams, depth, rows, width, 3] from the real nuScenes sweep (sample 0: its even
    points, sample 1: its odd points, so the whole 360 degree, ~100 m cloud is covered), signed
    features whose magnitudes span ~6 decades (float32 sums depend on the order)."""
    per = cams * depth * rows * width
    geom = np.stack([nuscenes_points[0::2][:per, :3], nuscenes_points[1::2][:per, :3]])
    geom = geom.reshape(2, cams, depth, rows, width, 3)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*geom.shape[:-1], channels)) * np.exp(rng.uniform(-7, 7, (*geom.shape[:-1], channels)))
    return torch.from_numpy(np.ascontiguousarray(geom)), torch.from_numpy(x.astype(np.float32))




def test_gen_dx_bx_matches_bevfusion():
    ref = ReferenceViewTransform(**NUS_BOUNDS)
    dx, bx, nx = gen_dx_bx(**NUS_BOUNDS)
    assert torch.equal(dx, ref.dx) and torch.equal(bx, ref.bx) and torch.equal(nx, ref.nx)
    assert nx.tolist() == [360, 360, 1]


@pytest.mark.parametrize("bounds", [NUS_BOUNDS, MULTI_Z], ids=["nus", "multi_z"])
def test_lss_bev_pool_matches_bevfusion(nuscenes_points, bounds):
    geom, x = _frustum(nuscenes_points)
    transform = ReferenceViewTransform(**bounds)
    ref = transform.bev_pool(geom, x)
    ours = lss_bev_pool(geom, x, **bounds)
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    assert torch.equal(LSSBevPool(**bounds)(geom, x), ref)
    # the cases that matter are present: shared cells, dropped points, cells reached by truncation
    # toward zero of (-1, 0) and the sums depend on the order (reversed order differs)
    v = (geom - (transform.bx - transform.dx / 2.0)) / transform.dx
    assert bool(((v > -1) & (v < 0)).any()) and bool(((v <= -1) | (v >= transform.nx.float())).any(-1).any())
    occupied = int((ref != 0).any(1).sum())
    assert 0 < occupied < geom[..., 0].numel() // 3  # many points share a cell
    flipped = transform.bev_pool(geom.flip(4), x.flip(4))
    assert not torch.equal(flipped, ref) and torch.allclose(flipped, ref, rtol=1e-3, atol=1e-3)


def test_bev_pool_matches_bevfusion_op(nuscenes_points):
    """The op itself, called like BaseViewTransform does (kept int64 coords, 0-d tensor sizes)."""
    geom, x = _frustum(nuscenes_points)
    dx, bx, nx = gen_dx_bx(**MULTI_Z)
    g = ((geom - (bx - dx / 2.0)) / dx).long().reshape(-1, 3)
    batch = torch.arange(2)[:, None].expand(2, g.shape[0] // 2).reshape(-1, 1)
    coords = torch.cat([g, batch], 1)
    kept = ((coords[:, :3] >= 0) & (coords[:, :3] < nx)).all(1)
    feats, coords = x.reshape(-1, x.shape[-1])[kept], coords[kept]
    ref = reference_bev_pool(feats, coords, 2, nx[2], nx[0], nx[1])
    ours = bev_pool(feats, coords, 2, nx[2], nx[0], nx[1])
    assert ours.shape == (2, x.shape[-1], 4, 160, 150) and torch.equal(ours, ref)
    assert torch.equal(bev_pool(feats, coords.int(), 2, 4, 160, 150), ref)  # int32 coords too


class _BevPoolOp(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes

    def forward(self, feats, coords):
        return bev_pool(feats, coords, *self.sizes)


def test_bev_pool_export(nuscenes_points, tmp_path):
    geom, x = _frustum(nuscenes_points, channels=4)
    dx, bx, nx = gen_dx_bx(**NUS_BOUNDS)
    g = ((geom - (bx - dx / 2.0)) / dx).long().reshape(-1, 3)
    batch = torch.arange(2)[:, None].expand(2, g.shape[0] // 2).reshape(-1, 1)
    coords = torch.cat([g, batch], 1)
    kept = ((coords[:, :3] >= 0) & (coords[:, :3] < nx)).all(1)
    feats, coords = x.reshape(-1, 4)[kept].contiguous(), coords[kept].contiguous()
    inputs = [(feats, coords), (feats[:9000].contiguous(), coords[:9000].contiguous())]
    n = torch.export.Dim("num_points", min=2)
    assert_exports(_BevPoolOp((2, 1, 360, 360)), inputs, ({0: n}, {0: n}), tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []


def test_lss_bev_pool_export(nuscenes_points, tmp_path):
    geom, x = _frustum(nuscenes_points, channels=4)
    inputs = [(geom, x), (geom[..., :450, :].contiguous(), x[..., :450, :].contiguous())]
    w = torch.export.Dim("width", min=2)
    assert_exports(LSSBevPool(**MULTI_Z), inputs, ({4: w}, {4: w}), tmp_path, exact=True)
    assert forbidden_onnx_ops(tmp_path / "op.onnx") == []
