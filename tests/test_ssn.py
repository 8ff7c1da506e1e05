"""SSN (MVXFasterRCNN with ShapeAwareHead): the lidar recipe with the shape-aware head's outputs.

ShapeAwareHead runs one small conv head per class group and concatenates their maps, so its
forward has Anchor3DHead's form: (cls_scores, bbox_preds, dir_cls_preds), one map per level.
"""

from __future__ import annotations

import json

import pytest

from codegen.configs import resolve_config
from codegen.recipes import recipe_for
from codegen.sample import load_config
from conftest import frame_path
from test_pipeline import cli

SSN_CONFIGS = [
    "ssn_hv_secfpn_sbn-all_16xb2-2x_nus-3d",
    "ssn_hv_regnet-400mf_secfpn_sbn-all_16xb2-2x_nus-3d",
    "ssn_hv_secfpn_sbn-all_16xb2-2x_lyft-3d",
    "ssn_hv_regnet-400mf_secfpn_sbn-all_16xb1-2x_lyft-3d",
]


@pytest.mark.parametrize("config", SSN_CONFIGS)
def test_ssn_configs_have_a_recipe(config):
    recipe = recipe_for(load_config(resolve_config(config)).model)
    assert recipe.name == "mvx_lidar"
    assert recipe.output_groups == ("cls_score", "bbox_pred", "dir_cls_pred")
    assert "pillar_scatter.vectorized" in recipe.patches


@pytest.mark.slow
def test_ssn_nuscenes_exports_and_matches_eager(tmp_path):
    frame_path("NuScenesDataset")
    out = tmp_path / "out"
    proc = cli("--config", SSN_CONFIGS[0], "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    validation = meta["validation"]
    assert validation["passed"] and validation["reference"] == "original", validation["summary"]
    assert max(validation["max_abs_diff"].values()) < 1e-4
    assert [o["name"] for o in meta["outputs"]] == ["cls_score", "bbox_pred", "dir_cls_pred"]
