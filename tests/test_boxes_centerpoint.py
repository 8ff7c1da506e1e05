"""codegen.boxes.centerpoint: fixed-shape CenterHead box decoding equals model.predict, and exports.

Real nuScenes frame through the config's test pipeline, randomly initialised (seeded)
CenterPoint pillar models, rotate and circle NMS.  With random weights every heatmap score is
~0.5, so the configs' score_threshold 0.1 keeps every candidate and each of the 6 tasks fills its
post_max_size (498 of K = 498 boxes: the threshold and the padding would go untested).
SCORE_THR = 0.503 (coder and test_cfg) leaves some tasks short of post_max_size, so the
validity mask, the padding and the NMS all shape the result.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from codegen.boxes import centerpoint, centerpoint_max_boxes
from codegen.export import canonical_boxes
from conftest import frame_path
from export_check import assert_exports

CONFIGS = {
    "rotate": "centerpoint_pillar02_second_secfpn_8xb4-cyclic-20e_nus-3d",
    "circle": "centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d",
}
SCORE_THR = 0.503
KEYS = ("reg", "height", "dim", "rot", "vel", "heatmap")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """nms_type, model, head, samples (full frame, every other point), their head outputs and
    model.predict on the full frame."""
    frame_path("NuScenesDataset")
    from codegen import sample as smp

    model = smp.load_model(CONFIGS[request.param])
    head = model.pts_bbox_head
    assert head.test_cfg["nms_type"] == request.param
    head.test_cfg["score_threshold"] = SCORE_THR
    head.bbox_coder.score_threshold = SCORE_THR
    ref = smp.default_frame_ref(model.cfg)
    samples = [smp.sample_frame(model, ref, variant=v, log=lambda *a: None) for v in (0, 1)]
    with torch.no_grad():
        outs = [head(model.extract_pts_feat(smp.clone_tree(s.data["inputs"])["voxels"])) for s in samples]
    return SimpleNamespace(
        nms_type=request.param, model=model, head=head, samples=samples, outs=outs, pred=_predict(model, samples[0])
    )


def _predict(model, s):
    from codegen import sample as smp

    with torch.no_grad():
        return model.predict(smp.clone_tree(s.data["inputs"]), s.data["data_samples"])[0].pred_instances_3d


def _assert_equal_to_predict(got, pred):
    """(bboxes, scores, labels) valid rows vs predict's instances, in canonical order."""
    want = canonical_boxes(pred.bboxes_3d.tensor.numpy(), pred.scores_3d.numpy(), pred.labels_3d.numpy())
    got = canonical_boxes(*(t.numpy() for t in got))
    assert got[0].shape == want[0].shape, f"{got[0].shape[0]} boxes, predict gives {want[0].shape[0]}"
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got[2], want[2])
    return want


def test_centerpoint_equals_predict(case):
    head = case.head
    with torch.no_grad():
        bboxes, scores, labels, num = centerpoint(head, case.outs[0])
    k = sum(centerpoint_max_boxes(head))
    assert k == 6 * 83
    assert bboxes.shape == (k, 9) and scores.shape == (k,) and labels.shape == (k,)
    n = int(num)
    assert 0 < n < k, f"{case.nms_type}: {n} of {k} boxes - adjust SCORE_THR"
    # valid rows first, by score; padding zero
    assert (scores[:n] > 0).all() and (scores[:n][:-1] >= scores[:n][1:]).all()
    assert (bboxes[n:] == 0).all() and (scores[n:] == 0).all() and (labels[n:] == 0).all()
    want = _assert_equal_to_predict((bboxes[:n], scores[:n], labels[:n]), case.pred)
    # the threshold bites: some task (label group) keeps fewer than post_max_size boxes, some fill it
    per_task = [np.isin(want[2], group).sum() for group in ([0], [1, 2], [3, 4], [5], [6, 7], [8, 9])]
    assert min(per_task) < 83 and max(per_task) == 83, per_task


def test_centerpoint_rotate_pre_max_size(case):
    """pre_max_size below the coder's max_num (the configs' 1000 > 500 never cuts) and a smaller
    post_max_size: K follows post_max_size and the result still equals predict."""
    if case.nms_type != "rotate":
        pytest.skip("pre_max_size only applies to rotate NMS")
    head = case.head
    saved = dict(head.test_cfg)
    head.test_cfg.update(pre_max_size=60, post_max_size=30)
    try:
        with torch.no_grad():
            bboxes, scores, labels, num = centerpoint(head, case.outs[0])
        pred = _predict(case.model, case.samples[0])
    finally:
        head.test_cfg.clear()
        head.test_cfg.update(saved)
    assert bboxes.shape == (6 * 30, 9)
    n = int(num)
    assert 0 < n < 6 * 30
    _assert_equal_to_predict((bboxes[:n], scores[:n], labels[:n]), pred)


class _Decoder(torch.nn.Module):
    """The flat head tensors (task-major, KEYS order) -> centerpoint(head, preds_dicts)."""

    def __init__(self, head, num_tasks: int):
        super().__init__()
        self.decode = lambda preds: centerpoint(head, preds)  # the head's weights stay out of the graph
        self.num_tasks = num_tasks

    def forward(self, *flat):
        preds = tuple([dict(zip(KEYS, flat[i * len(KEYS) : (i + 1) * len(KEYS)]))] for i in range(self.num_tasks))
        return self.decode(preds)


def test_centerpoint_exports(case, tmp_path):
    """The decoder alone: PT2 and onnxruntime equal eager on the head outputs of two frames."""
    outs = case.outs
    flat = [tuple(task[0][key] for task in out for key in KEYS) for out in outs]
    assert not torch.equal(flat[0][-1], flat[1][-1])  # two different frames
    decoder = _Decoder(case.head, len(outs[0]))
    with torch.no_grad():
        counts = [int(decoder(*args)[3]) for args in flat]
    assert all(0 < c < 498 for c in counts), counts
    assert_exports(decoder, flat, None, tmp_path, atol=1e-5)
