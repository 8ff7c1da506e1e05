"""CenterPoint with the DCN separate head (``DCNSeparateHead``: mmcv ``DCN``, groups 4) end to end on
the real nuScenes frame: generate -> PT2 -> validation against the original eager model, whose
deformable convolutions run mmcv's CPU kernel.

mmcv initialises the offset convolution to zero (a deformable conv then samples the regular
grid), so the test gives it random weights first: the taps move by a few cells and the check
covers real deformable sampling. ONNX of the same op is checked in tests/ops/test_deform_conv.py.
"""

from __future__ import annotations

import torch
from mmcv.ops import DeformConv2dPack

from codegen.export import run_export
from codegen.generate import generate
from conftest import frame_path

CONFIG = "centerpoint_pillar02_second_secfpn_head-dcn_8xb4-cyclic-20e_nus-3d"


def test_centerpoint_dcn_head_exports_and_matches_mmcv(tmp_path):
    frame_path("NuScenesDataset")
    gen = generate(CONFIG, device="cpu")
    assert {"dcn.pack", "pillar_scatter.vectorized"} <= set(gen.recipe.patches)
    dcns = [m for m in gen.model.modules() if isinstance(m, DeformConv2dPack)]
    assert len(dcns) == 12  # 6 tasks x (classification, regression)
    torch.manual_seed(1)
    for m in dcns:
        torch.nn.init.normal_(m.conv_offset.weight, std=0.02)
        torch.nn.init.normal_(m.conv_offset.bias, std=1.0)
    path = tmp_path / f"wrapper_{gen.model_name}.py"
    path.write_text(gen.source)
    meta = run_export(path, tmp_path / "out", "pt2", device="cpu", generated=gen)
    validation = meta["validation"]
    assert validation["passed"] and validation["reference"] == "original", validation["summary"]
    assert validation["max_abs_diff"]["pt2"] < 1e-4
    assert len({r["size"] for r in validation["rows"]}) == 2
