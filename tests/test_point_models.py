"""Point-set models run eagerly on the CPU with the op library patched in (mmcv's ops are CUDA-only)."""

from __future__ import annotations

import pytest
import torch

from codegen import patches
from codegen import sample as smp
from codegen.patches.points import POINT_PATCHES
from codegen.recipes import recipe_for
from conftest import frame_path

VOTENET = "votenet_8xb16_sunrgbd-3d"


@pytest.fixture(scope="module")
def votenet():
    frame_path("SUNRGBDDataset")
    model = smp.load_model(VOTENET)
    return model, smp.sample_frame(model, smp.default_frame_ref(model.cfg))


def test_random_test_pipeline_steps_are_seeded(votenet):
    """SUN RGB-D's test pipeline draws 20,000 of the frame's points at random (PointSample):
    the sample is the same in every run (the exported graph is validated on it), and the
    caller's numpy random state is left as it was."""
    import numpy as np

    model, s = votenet
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    again = smp.sample_frame(model, smp.default_frame_ref(model.cfg))
    assert np.random.random() == expected_next
    first, second = s.data["inputs"]["points"][0], again.data["inputs"]["points"][0]
    assert first.shape == (20000, second.shape[1])
    assert torch.equal(first, second)


def test_votenet_cannot_run_on_cpu_without_the_patches(votenet):
    model, s = votenet
    with torch.no_grad(), pytest.raises(Exception) as info:
        model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])
    assert "cuda" in str(info.value).lower() or "not found" in str(info.value).lower()


def test_votenet_predicts_on_cpu_with_the_patches(votenet):
    model, s = votenet
    assert s.data["inputs"]["points"][0].shape == (20000, 4)  # SUN RGB-D pipeline: PointSample 20000
    assert recipe_for(model.cfg.model).predict_patches == POINT_PATCHES  # what bench and --outputs boxes use
    with torch.no_grad(), patches.applied(POINT_PATCHES):
        pred = model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])[0].pred_instances_3d
        again = model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])[0].pred_instances_3d
    n = pred.scores_3d.shape[0]
    assert n > 0 and pred.bboxes_3d.tensor.shape == (n, 7)
    assert torch.isfinite(pred.bboxes_3d.tensor).all() and torch.isfinite(pred.scores_3d).all()
    assert pred.labels_3d.max() < 10  # SUN RGB-D's 10 classes
    # deterministic: the patched ops have fixed tie rules
    assert torch.equal(pred.bboxes_3d.tensor, again.bboxes_3d.tensor)
    # and the originals are back afterwards
    import mmcv.ops
    from mmcv.ops import points_sampler

    from codegen.ops.points import furthest_point_sample

    assert points_sampler.furthest_point_sample is mmcv.ops.furthest_point_sample is not furthest_point_sample


def test_votenet_exports_and_matches_the_patched_model(tmp_path):
    """Points in (a fixed 20,000-point sample), vote head out, PT2 and ONNX.  Without an IREE
    target the furthest-point-sampling loops (2048 + 1024 + 512 + 256 + 256 steps) export as one
    ONNX Scan each, so the conversion takes seconds instead of the unrolled graph's ~30 min."""
    import json

    import onnx
    from test_pipeline import cli

    frame_path("SUNRGBDDataset")
    out = tmp_path / "votenet"
    proc = cli("--config", VOTENET, "--output-dir", str(out), "--format", "both", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["export_info"]["input_names"] == ["points"]
    assert meta["validation"]["passed"] and meta["validation"]["reference"] == "patched"
    assert meta["validation"]["max_abs_diff"]["pt2"] < 1e-4
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "Scan" in ops
    names = [o["name"] for o in meta["outputs"]]
    assert {"center", "obj_scores", "size_res", "sem_scores"} <= set(names)


def test_stable_topk_breaks_ties_like_onnx_topk(tmp_path):
    """Group-Free 3D's seed sampling: ``torch.topk`` leaves tied scores' order open; the patch
    takes the lower index first, as ONNX TopK (and onnxruntime) does, and exports to that."""
    import numpy as np
    import onnxruntime as ort

    from codegen.patches.points import forced_topk, stable_topk

    x = torch.tensor([[0.5, 0.7, 0.5, 0.5, 0.9, 0.7, 0.5]])
    values, index = stable_topk(x, 5)
    assert index.tolist() == [[4, 1, 5, 0, 2]]
    assert torch.equal(values, x[0, index[0]].unsqueeze(0))
    distinct = torch.randn(2, 1024)
    assert torch.equal(stable_topk(distinct, 256)[1], torch.topk(distinct, 256).indices)
    with forced_topk(torch.tensor([[6, 2]])):
        assert stable_topk(x, 2)[1].tolist() == [[6, 2]]

    class TopK(torch.nn.Module):
        def forward(self, s):
            return stable_topk(s, 5)[1]

    program = torch.export.export(TopK(), (x,))
    torch.onnx.export(program, (), str(tmp_path / "topk.onnx"), dynamo=True)
    session = ort.InferenceSession(str(tmp_path / "topk.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(got, [[4, 1, 5, 0, 2]])


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, dataset",
    [
        # the VoteNet recipe; the kps seed choice is re-run where onnxruntime ordered near-equal logits differently
        ("groupfree3d_head-L6-O256_4xb8_scannet-seg", "ScanNetDataset"),
        # recipe point_rcnn: the first stage's point-wise predictions
        ("point-rcnn_8xb2_kitti-3d-3class", "KittiDataset"),
    ],
)
def test_point_model_exports_and_matches_the_patched_model(tmp_path, config, dataset):
    """Group-Free 3D, PointRCNN: PT2 and ONNX match the patched eager model (~2.5 min each)."""
    import json

    from test_pipeline import cli

    frame_path(dataset)
    out = tmp_path / "export"
    proc = cli("--config", config, "--output-dir", str(out), "--format", "both", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["validation"]["passed"] and meta["validation"]["reference"] == "patched"
    assert meta["validation"]["max_abs_diff"]["pt2"] == 0
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
