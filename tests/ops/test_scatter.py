"""BEV scatter with the backbone's first convolution (codegen/ops/scatter.py ``scatter_conv_to_bev``)
and the pillar patches that hand it that convolution (codegen/patches/voxelnet.py).

The reference is mmdet3d's own ``PointPillarsScatter.forward`` (its per-sample loop, unpatched)
followed by ``torch.nn.functional.conv2d`` on the canvas.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_check import assert_exports, forbidden_onnx_ops
from mmdet3d.models.middle_encoders import PointPillarsScatter

from codegen import patches, sample
from codegen.ops.scatter import BevConv, scatter_conv_to_bev
from codegen.patches.voxelnet import dense_tail, fusable_first_layer
from codegen.recipes import recipe_for
from conftest import frame_path

PP = "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car"


def _pillars(batch: int, ny: int, nx: int, n: int, channels: int, seed: int = 0):
    """``n`` distinct cells of a ``batch`` x ``ny`` x ``nx`` grid as mmdet3d's coors (b, z, y, x),
    in random order, with random features."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(batch * ny * nx, generator=g)[:n]
    coors = torch.stack([cells // (ny * nx), torch.zeros_like(cells), cells // nx % ny, cells % nx], 1).int()
    return torch.randn(n, channels, generator=g), coors


def _conv(channels: int, out: int, kernel, stride, padding, seed: int = 1) -> BevConv:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, channels, *kernel, generator=g) / (channels * kernel[0] * kernel[1]) ** 0.5
    return BevConv(weight, torch.randn(out, generator=g), stride, padding)


def _reference(features, coors, batch, ny, nx, conv: BevConv) -> torch.Tensor:
    """mmdet3d's scatter, then the convolution on the dense canvas; channels-last as the op."""
    scatter = PointPillarsScatter(features.shape[1], [ny, nx])
    canvas = scatter(features, coors, batch)
    out = torch.nn.functional.conv2d(canvas, conv.weight, conv.bias, conv.stride, conv.padding)
    return out.permute(0, 2, 3, 1)


CASES = {
    # kernel, stride, padding: PointPillars' first layer, then other shapes the op accepts
    "3x3-s2-p1": ((3, 3), (2, 2), (1, 1)),
    "3x3-s1-p1": ((3, 3), (1, 1), (1, 1)),
    "5x5-s3-p2": ((5, 5), (3, 3), (2, 2)),
    "1x1-s1-p0": ((1, 1), (1, 1), (0, 0)),
    "2x2-s2-p0": ((2, 2), (2, 2), (0, 0)),
    "3x1-s2x1-p1x0": ((3, 1), (2, 1), (1, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scatter_conv_equals_conv_of_mmdet3d_canvas(case):
    kernel, stride, padding = CASES[case]
    batch, ny, nx = 2, 13, 11  # odd sizes: the last row / column only partly covered by a stride
    features, coors = _pillars(batch, ny, nx, n=60, channels=5)
    conv = _conv(5, 7, kernel, stride, padding)
    out = scatter_conv_to_bev(features, coors, batch, ny, nx, conv)
    ref = _reference(features, coors, batch, ny, nx, conv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_scatter_conv_no_rows_is_the_bias():
    conv = _conv(4, 6, (3, 3), (2, 2), (1, 1))
    out = scatter_conv_to_bev(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), 2, 9, 11, conv)
    assert out.shape == (2, 5, 6, 6)
    assert torch.equal(out, conv.bias.expand(2, 5, 6, 6))


class _ScatterConv(torch.nn.Module):
    def __init__(self, conv: BevConv, batch: int, ny: int, nx: int):
        super().__init__()
        self.conv, self.batch, self.ny, self.nx = conv, batch, ny, nx

    def forward(self, features, coors):
        return scatter_conv_to_bev(features, coors, self.batch, self.ny, self.nx, self.conv)


def test_scatter_conv_exports_and_onnxruntime_is_deterministic(tmp_path):
    """PT2 and onnxruntime equal eager at two pillar counts; no ScatterND add (it races in
    onnxruntime); two-thread onnxruntime runs give identical bits run after run."""
    batch, ny, nx = 1, 96, 80  # dense enough that neighbouring pillars share output cells
    conv = _conv(16, 32, (3, 3), (2, 2), (1, 1))
    inputs = [_pillars(batch, ny, nx, n, 16, seed=n) for n in (1500, 900)]
    n = torch.export.Dim("n", min=2)
    assert_exports(_ScatterConv(conv, batch, ny, nx), inputs, ({0: n}, {0: n}), tmp_path, atol=1e-5)
    path = tmp_path / "op.onnx"
    assert forbidden_onnx_ops(path) == []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], (inputs[0][0].numpy(), inputs[0][1].numpy())))
    first = session.run(None, feeds)[0]
    for _ in range(5):
        np.testing.assert_array_equal(session.run(None, feeds)[0], first)


# ------------------------------------------------------------------ the pillar patches


@pytest.fixture(scope="module")
def pointpillars():
    """PointPillars KITTI (random weights, non-trivial BatchNorm statistics in the backbone) and
    its voxel features and coors on the real KITTI frame."""
    frame_path("KittiDataset")
    model = sample.load_model(PP)
    g = torch.Generator().manual_seed(0)
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    voxels = sample.sample_frame(model, sample.default_frame_ref(model.cfg), 0).data["inputs"]["voxels"]
    with torch.no_grad():
        features = model.voxel_encoder(voxels["voxels"].clone(), voxels["num_points"], voxels["coors"])
    return model, features, voxels["coors"]


def test_pointpillars_tail_with_fused_first_layer_equals_mmdet3d(pointpillars):
    """The recipe's patches hand the backbone's first conv + BN to the scatter; the neck's output
    equals mmdet3d's scatter -> SECOND -> SECONDFPN on the real frame's 3945-odd pillars."""
    model, features, coors = pointpillars
    assert features.shape[0] > 3000
    with torch.no_grad():
        ref = model.neck(model.backbone(model.middle_encoder(features, coors, 1)))
        assert fusable_first_layer(model.middle_encoder, model.backbone) is None  # original forward
        recipe = recipe_for(model.cfg.model)
        with patches.applied(recipe.patches, batch_size=1):
            first = fusable_first_layer(model.middle_encoder, model.backbone)
            out = dense_tail(model, features, coors)
    assert isinstance(first, BevConv) and first.stride == (2, 2)
    assert len(out) == len(ref) == 1
    scale = ref[0].abs().max()
    torch.testing.assert_close(out[0], ref[0], atol=1e-5 * scale, rtol=1e-5)


def test_padded_pillar_scatter_with_first_layer_skips_padding_rows(pointpillars):
    """The dynamic-voxel scatter (``pillar_scatter.padded``) takes the first layer too: it
    convolves its first ``M`` rows (the pillars; padding rows, coors -1, come after them), and
    the result equals that conv on the canvas of the pillars alone."""
    model, features, coors = pointpillars
    g = torch.Generator().manual_seed(1)
    padded_features = torch.cat([features, torch.randn(500, features.shape[1], generator=g)])
    padded_coors = torch.cat([coors, torch.full((500, 4), -1, dtype=coors.dtype)])
    with torch.no_grad(), patches.applied(("pillar_scatter.padded",), batch_size=1):
        first = fusable_first_layer(model.middle_encoder, model.backbone)
        assert isinstance(first, BevConv)
        canvas = model.middle_encoder(padded_features, padded_coors, 1)
        out = model.middle_encoder(padded_features, padded_coors, 1, first_layer=first)
    ref = torch.nn.functional.conv2d(canvas, first.weight, first.bias, first.stride, first.padding)
    ref = ref.permute(0, 2, 3, 1)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max(), rtol=1e-5)
