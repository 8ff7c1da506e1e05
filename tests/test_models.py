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

# config -> (dataset of its frame, wrapper inputs)
MODELS = {
    "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d": ("NuScenesDataset", ["voxels", "num_points", "coors"]),
}


@pytest.mark.parametrize("config", sorted(MODELS))
def test_model_exports_and_matches_eager(config, tmp_path):
    dataset, inputs = MODELS[config]
    frame_path(dataset)
    out = tmp_path / "out"
    proc = cli("--config", config, "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["frame"] == DEFAULT_FRAMES[dataset]
    assert meta["export_info"]["input_names"] == inputs
    assert meta["validation"]["passed"], meta["validation"]["summary"]
    assert set(meta["validation"]["max_abs_diff"]) == {"eager-patched", "pt2", "onnx"}
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
    sizes = {r["size"] for r in meta["validation"]["rows"]}
    assert len(sizes) == 2, "two different input sizes validated"
    wrapper = next(out.glob("wrapper_*.py"))
    assert wrapper.read_text() == (REPO / "generated" / wrapper.name).read_text()


def test_every_committed_wrapper_is_covered():
    from codegen.cli import committed_wrappers

    configs = {config.split("/")[-1].removesuffix(".py") for _, config, _, _ in committed_wrappers()}
    assert configs - {"pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car"} <= set(MODELS)
