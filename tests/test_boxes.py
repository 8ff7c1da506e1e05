"""Decoded boxes (--outputs boxes): the exported graph gives what model.predict gives."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mmengine.config import ConfigDict

from codegen.boxes import multiclass_nms_fixed, xywhr_to_xyxyr
from codegen.export import canonical_boxes, import_wrapper, valid_boxes_by_score
from conftest import REPO, frame_path
from test_pipeline import CONFIG, cli

BOXES_WRAPPER = REPO / "generated" / "wrapper_pointpillars_hv_secfpn_8xb6_160e_kitti_3d_car_boxes.py"


@pytest.mark.parametrize("use_rotate_nms", [True, False])
@pytest.mark.parametrize("score_thr", [0.1, 0.5])
def test_multiclass_nms_fixed_equals_box3d_multiclass_nms(kitti_points, use_rotate_nms, score_thr):
    """Three classes, boxes centred on real KITTI points, against mmdet3d's own function."""
    from mmdet3d.models.layers import box3d_multiclass_nms

    g = torch.Generator().manual_seed(3)
    pts = torch.from_numpy(kitti_points[:, :3])
    centres = pts[torch.randperm(pts.shape[0], generator=g)[:300]]
    sizes = torch.rand(300, 3, generator=g) * torch.tensor([4.0, 2.0, 1.5]) + 0.5
    yaw = (torch.rand(300, 1, generator=g) - 0.5) * 2 * np.pi
    bboxes = torch.cat([centres, sizes, yaw], dim=1)
    scores = torch.rand(300, 3, generator=g)
    dirs = torch.randint(0, 2, (300,), generator=g)
    cfg = ConfigDict(use_rotate_nms=use_rotate_nms, nms_thr=0.1, max_num=50)
    bev = xywhr_to_xyxyr(bboxes[:, [0, 1, 3, 4, 6]])
    padded = torch.cat([scores, scores.new_zeros(300, 1)], dim=1)
    ref_b, ref_s, ref_l, ref_d = box3d_multiclass_nms(bboxes, bev, padded, score_thr, 50, cfg, dirs)
    b, s, l, (d,), n = multiclass_nms_fixed(bboxes, bev, scores, score_thr, 50, cfg, (dirs,))
    assert b.shape == (50, 7) and s.shape == (50,)
    assert int(n) == ref_b.shape[0] > 10
    got = canonical_boxes(torch.cat([b, d[:, None].float()], 1)[: int(n)].numpy(), s[: int(n)].numpy(), l[: int(n)].numpy())
    want = canonical_boxes(torch.cat([ref_b, ref_d[:, None].float()], 1).numpy(), ref_s.numpy(), ref_l.numpy())
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    assert (s[int(n) :] == 0).all() and (b[int(n) :] == 0).all()


@pytest.fixture(scope="module")
def exported_boxes(tmp_path_factory):
    frame_path("KittiDataset")
    out = tmp_path_factory.mktemp("boxes") / "pp_boxes"
    proc = cli("--config", CONFIG, "--outputs", "boxes", "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out


def test_boxes_export_validates_against_predict(exported_boxes):
    meta = json.loads((exported_boxes / "metadata.json").read_text())
    assert [o["name"] for o in meta["outputs"]] == ["bboxes_3d", "scores_3d", "labels_3d", "num_boxes"]
    assert meta["outputs"][0]["shape"] == [50, 7]
    assert meta["validation"]["passed"]
    rows = meta["validation"]["rows"]
    assert {r["runtime"] for r in rows} == {"eager-patched", "pt2", "onnx"}
    # a meaningful number of boxes survives the config's own score_thr 0.1 with random weights
    counts = {r["sample"]: r["shape"][0] for r in rows if r["output"] == "bboxes_3d"}
    assert counts[0] >= 5 and counts[1] >= 5
    assert (exported_boxes / BOXES_WRAPPER.name).read_text() == BOXES_WRAPPER.read_text()


def test_onnx_boxes_equal_model_predict(exported_boxes):
    """Independently of the tool's validation: ORT on inputs.npz vs mmdet3d's predict."""
    module = import_wrapper(BOXES_WRAPPER)
    wrapper = module.build()
    from codegen import sample as smp

    s = smp.sample_frame(wrapper.model, module.FRAME)
    with torch.no_grad():
        pred = wrapper.model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])[0].pred_instances_3d
    want = canonical_boxes(pred.bboxes_3d.tensor.numpy(), pred.scores_3d.numpy(), pred.labels_3d.numpy())
    saved = np.load(exported_boxes / "inputs.npz")
    session = ort.InferenceSession(str(exported_boxes / "model.onnx"), providers=["CPUExecutionProvider"])
    got = valid_boxes_by_score(session.run(None, {k: saved[k] for k in module.INPUT_NAMES}))
    assert got[0].shape == want[0].shape and got[0].shape[0] > 0
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    np.testing.assert_array_equal(got[2], want[2])


def test_centerpoint_pillar_boxes_end_to_end(tmp_path):
    """CenterPoint pillar on the nuScenes frame: points' voxels in, decoded boxes out (PT2 + ONNX)."""
    frame_path("NuScenesDataset")
    config = "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d"
    out = tmp_path / "cp_boxes"
    proc = cli("--config", config, "--outputs", "boxes", "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["validation"]["passed"] and meta["outputs"][0]["shape"] == [498, 9]
    counts = {r["sample"]: r["shape"][0] for r in meta["validation"]["rows"] if r["output"] == "bboxes_3d"}
    assert min(counts.values()) > 100  # score_thr 0.1 of the config keeps many boxes of the random model
    assert meta["validation"]["max_abs_diff"]["onnx"] < 1e-4
