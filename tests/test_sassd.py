"""SA-SSD (recipe ``sassd``): SECOND-style sparse encoder whose auxiliary point branch only trains.

The patched extract_feat (static batch size, spconv swapped for codegen/ops/sparse_conv.py) is
compared with mmdet3d's own on the real KITTI frame (spconv's CPU kernels, one thread: they race
with more); the full export is a slow test (sparse-conv graphs take minutes to export).
"""

from __future__ import annotations

import json

import pytest
import torch

from codegen import patches
from codegen import sample as smp
from codegen.recipes import recipe_for
from codegen.validate import one_thread
from conftest import frame_path
from test_pipeline import cli

SASSD = "sassd_8xb6-80e_kitti-3d-3class"


def test_patched_sassd_equals_mmdet3d():
    frame_path("KittiDataset")
    model = smp.load_model(SASSD)
    recipe = recipe_for(model.cfg.model)
    assert recipe.name == "sassd"
    assert recipe.patches == ("sassd.static_batch_size", "spconv.conv", "spconv.dense")
    inputs = smp.sample_frame(model, smp.default_frame_ref(model.cfg)).data["inputs"]
    with torch.no_grad(), one_thread():
        ref = model._forward(smp.clone_tree(inputs))
        with patches.applied(recipe.patches, batch_size=1):
            ours = model._forward(smp.clone_tree(inputs))
    ref, ours = smp.tensors(ref), smp.tensors(ours)
    assert len(ref) == len(ours) == 3  # cls_score, bbox_pred, dir_cls_pred (one level)
    for r, o in zip(ref, ours):
        assert r.shape == o.shape
        assert (r - o).abs().max().item() < 1e-4


@pytest.mark.slow
def test_sassd_exports_and_matches_eager(tmp_path):
    frame_path("KittiDataset")
    out = tmp_path / "out"
    proc = cli("--config", SASSD, "--output-dir", str(out), "--device", "cpu", "--format", "pt2")
    assert proc.returncode == 0, proc.stderr
    validation = json.loads((out / "metadata.json").read_text())["validation"]
    assert validation["passed"] and validation["reference"] == "original", validation["summary"]
    assert validation["max_abs_diff"]["pt2"] < 1e-4
    assert len({r["size"] for r in validation["rows"]}) == 2
