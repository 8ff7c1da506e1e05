"""Model coverage: each recipe end to end on its real frame through the config's test pipeline.

generate -> PT2 + ONNX export -> validation (reloaded PT2 and onnxruntime vs the original eager
model on two point counts) -> metadata.json, via the real CLI; and every committed wrapper is one
of these. The zoo-wide sweep is marked slow.
"""

from __future__ import annotations

import json

import pytest

from codegen.sample import DEFAULT_FRAMES
from conftest import REPO, frame_path
from test_pipeline import cli

VOXELS = ["voxels", "num_points", "coors"]
# config -> (dataset of its frame, wrapper inputs, formats checked in CI). Sparse-conv models
# give large unrolled graphs whose ONNX conversion takes minutes: CI checks PT2, the slow test both.
MODELS = {
    "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d": ("NuScenesDataset", VOXELS, "both"),
    "pointpillars_hv_fpn_sbn-all_8xb4-2x_nus-3d": ("NuScenesDataset", VOXELS, "both"),
    "second_hv_secfpn_8xb6-80e_kitti-3d-car": ("KittiDataset", VOXELS, "pt2"),
    "centerpoint_voxel01_second_secfpn_8xb4-cyclic-20e_nus-3d": ("NuScenesDataset", VOXELS, "pt2"),
}
SPARSE = [c for c, (_, _, fmt) in MODELS.items() if fmt != "both"]


def _export_and_check(config: str, fmt: str, tmp_path):
    dataset, inputs, _ = MODELS[config]
    frame_path(dataset)
    out = tmp_path / "out"
    proc = cli("--config", config, "--output-dir", str(out), "--device", "cpu", "--format", fmt)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["frame"] == DEFAULT_FRAMES[dataset]
    assert meta["export_info"]["input_names"] == inputs
    assert meta["validation"]["passed"], meta["validation"]["summary"]
    runtimes = {"eager-patched", "pt2", "onnx"} if fmt == "both" else {"eager-patched", fmt}
    assert set(meta["validation"]["max_abs_diff"]) == runtimes
    assert max(meta["validation"]["max_abs_diff"].values()) < 1e-4
    sizes = {r["size"] for r in meta["validation"]["rows"]}
    assert len(sizes) == 2, "two different input sizes validated"
    wrapper = next(out.glob("wrapper_*.py"))
    assert wrapper.read_text() == (REPO / "generated" / wrapper.name).read_text()


@pytest.mark.parametrize("config", sorted(MODELS))
def test_model_exports_and_matches_eager(config, tmp_path):
    _export_and_check(config, MODELS[config][2], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", SPARSE)
def test_sparse_model_onnx(config, tmp_path):
    _export_and_check(config, "both", tmp_path)


def test_every_committed_wrapper_has_an_end_to_end_test():
    from codegen.cli import committed_wrappers

    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for path, config, _, _ in committed_wrappers():
        name = config.split("/")[-1].removesuffix(".py")
        assert f'"{name}"' in tests, f"{path.name}: no test exports {name}"


@pytest.mark.slow
def test_parta2_rpn_exports_and_matches_eager(tmp_path):
    """Part-A2 (recipe parta2): SparseUNet's encoder with the sparse-conv ops -> RPN head maps,
    against the original eager model (spconv on the CPU); ~2 min."""
    frame_path("KittiDataset")
    out = tmp_path / "out"
    config = "parta2_hv_secfpn_8xb2-cyclic-80e_kitti-3d-car"
    proc = cli("--config", config, "--output-dir", str(out), "--device", "cpu", "--format", "both")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["validation"]["passed"] and meta["validation"]["reference"] == "original"
    assert [o["name"] for o in meta["outputs"]][:1] == ["cls_score"]
    assert max(meta["validation"]["max_abs_diff"].values()) < 1e-4


def test_parta2_predict_runs_under_the_recipe_predict_patches():
    """Part-A2's export stops at the RPN maps, whose tensor path runs the original model; mmdet3d's
    full predict (bench/models.py's baseline, ``--outputs boxes``' reference) also runs the RoI
    stage, whose RoIAwarePool3d is CUDA-only in mmcv, and runs under the recipe's
    ``predict_patches`` (``codegen.ops.roi.roiaware_pool3d``, both pooling modes)."""
    import torch

    from codegen import sample
    from codegen.generate import predict_context
    from codegen.recipes import recipe_for

    frame_path("KittiDataset")
    model = sample.load_model("parta2_hv_secfpn_8xb2-cyclic-80e_kitti-3d-3class")
    data = sample.sample_frame(model, sample.default_frame_ref(model.cfg), 0).data
    recipe = recipe_for(model.cfg.model)
    assert recipe.reference == "original" and recipe.predict_patches == ("points.roiaware_pool3d",)
    with torch.no_grad(), pytest.raises(Exception, match="roiaware_pool3d.*not found"):
        model.predict(sample.clone_tree(data["inputs"]), data["data_samples"])
    modes = {layer.mode for layer in model.modules() if type(layer).__name__ == "RoIAwarePool3d"}
    assert modes == {0, 1}  # max (seg_roi_extractor) and avg (bbox_roi_extractor, the part features)
    with torch.no_grad(), predict_context(recipe, 1):
        pred = model.predict(sample.clone_tree(data["inputs"]), data["data_samples"])[0].pred_instances_3d
    n = pred.scores_3d.shape[0]
    assert pred.bboxes_3d.tensor.shape == (n, 7) and torch.isfinite(pred.bboxes_3d.tensor).all()
    assert n > 0


def test_mmdet2_style_nuimages_config_is_migrated():
    """mmdet3d 1.4.0 ships its nuImages 2D detectors in mmdet 2.x form (``model.pretrained``, no
    data_preprocessor, ``MultiScaleFlipAug``), which mmdet 3.x cannot build or run; loading
    brings them to the 3.x form (caffe-style normalisation for a caffe backbone)."""
    from codegen.configs import resolve_config
    from codegen.recipes import recipe_for
    from codegen.sample import build_model, load_config

    said = []
    cfg = load_config(resolve_config("mask-rcnn_r50_caffe_fpn_1x_nuim"), said.append)
    assert "pretrained" not in cfg.model
    # --verbose says what was migrated
    assert len(said) == 3 and all(line.startswith("mmdet 2.x config migrated: ") for line in said), said
    assert any("data_preprocessor" in line and "caffe" in line for line in said)
    assert cfg.model.data_preprocessor.mean == [103.53, 116.28, 123.675] and not cfg.model.data_preprocessor.bgr_to_rgb
    assert [s["type"] for s in cfg.test_pipeline] == ["LoadImageFromFile", "mmdet.Resize", "mmdet.PackDetInputs"]
    assert cfg.test_pipeline[1]["scale"] == (1600, 900)
    assert recipe_for(cfg.model).name == "rpn_2d"
    assert type(build_model(cfg)).__name__ == "MaskRCNN"


@pytest.mark.slow
def test_nuimages_rpn_exports_and_matches_eager(tmp_path):
    """nuImages Mask R-CNN (recipe rpn_2d): a camera image through the migrated test pipeline,
    backbone + FPN + RPN maps, PT2 and ONNX against the original eager model; ~2 min."""
    frame_path("NuScenesDataset")
    out = tmp_path / "out"
    proc = cli("--config", "mask-rcnn_r50_fpn_1x_nuim", "--output-dir", str(out), "--device", "cpu", "--format", "both")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["export_info"]["input_names"] == ["imgs"]
    assert meta["validation"]["passed"] and meta["validation"]["reference"] == "original"
    assert max(meta["validation"]["max_abs_diff"].values()) < 1e-4
