"""``run``: an exported model on a point-cloud file gives model.predict's boxes, as JSON and a BEV picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codegen import sample as smp
from codegen.export import canonical_boxes
from conftest import CONFIG, cli, frame_path


@pytest.fixture(scope="module")
def predicted():
    """What mmdet3d's own predict gives on the KITTI frame (same seed-0 weights as the export)."""
    model = smp.load_model(CONFIG)
    s = smp.sample_frame(model, "kitti/000008.bin")
    with torch.no_grad():
        pred = model.predict(s.data["inputs"], s.data["data_samples"])[
            0
        ].pred_instances_3d
    return canonical_boxes(
        pred.bboxes_3d.tensor.numpy(), pred.scores_3d.numpy(), pred.labels_3d.numpy()
    )


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_run_gives_the_boxes_of_model_predict(exported, predicted, fmt, tmp_path):
    """Head outputs exported; run preprocesses the raw file and decodes the boxes itself."""
    out, _ = exported
    frame = frame_path("KittiDataset")
    proc = cli(
        "run",
        str(out),
        "--points",
        str(frame),
        "--format",
        fmt,
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "000008.boxes.json").read_text())
    assert result["format"] == fmt and result["num_points"] == 17238
    rows = result["boxes"]
    assert len(rows) == result["num_boxes"] == predicted[0].shape[0] > 0
    assert {r["class"] for r in rows} == {"Car"}
    got = canonical_boxes(
        np.array([r["box"] for r in rows]),
        np.array([r["score"] for r in rows]),
        np.array([r["label"] for r in rows]),
    )
    for g, w in zip(got, predicted):
        np.testing.assert_allclose(g, w, atol=2e-4)  # JSON rounds to 5-6 digits
    assert f"{len(rows)} boxes ->" in proc.stdout + proc.stderr

    import matplotlib.image

    png = matplotlib.image.imread(tmp_path / "000008.bev.png")
    assert png.ndim == 3 and png.shape[0] > 500 and png.shape[1] > 500
    assert png[..., :3].std() > 0.01  # something is drawn


def test_run_rejects_a_bad_cloud_without_writing(exported, tmp_path):
    out, _ = exported
    bad = tmp_path / "nan.bin"
    cloud = (
        np.fromfile(frame_path("KittiDataset"), dtype=np.float32)
        .reshape(-1, 4)[:1000]
        .copy()
    )
    cloud[10, 2] = np.nan
    cloud.tofile(bad)
    target = tmp_path / "result"
    proc = cli("run", str(out), "--points", str(bad), "--output-dir", str(target))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "NaN" in errors[0]
    assert not target.exists() or not any(target.iterdir())


def test_run_needs_the_metadata(exported, tmp_path):
    out, _ = exported
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes((out / "model.onnx").read_bytes())
    proc = cli(
        "run",
        str(lonely),
        "--points",
        str(frame_path("KittiDataset")),
        "--output-dir",
        str(tmp_path),
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "metadata.json" in errors[0]


FLUSH_PROBE = """
import sys
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from codegen.validate import ort_session
graph = helper.make_graph(
    [helper.make_node("Mul", ["x", "two"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    [numpy_helper.from_array(np.array(2, np.float32), "two")],
)
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), sys.argv[2])
x = np.array([1e-40, 1e-30, 1.0], np.float32)  # a denormal, a small normal, one
session = ort_session(sys.argv[2], 1) if sys.argv[1] == "tool" else ort.InferenceSession(sys.argv[2])
print(repr(session.run(None, {"x": x})[0].tolist()))
"""


@pytest.mark.parametrize("session", ["tool", "plain"])
def test_onnxruntime_sessions_flush_denormals(session, tmp_path):
    """The tool's onnxruntime sessions (validation, ``run``, the bench) flush denormal floats to
    zero: BEVFusion's camera graph ran 1.6x slower on denormal operands. onnxruntime applies the
    setting to the calling thread once per process (first session), hence a fresh process each;
    a plain session keeps the denormal (so this check can fail)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FLUSH_PROBE, session, str(tmp_path / "mul.onnx")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doubled = eval(proc.stdout.strip().splitlines()[-1])
    assert doubled[1:] == [np.float32(2e-30), 2.0]
    assert (doubled[0] == 0.0) == (session == "tool"), doubled
