"""Issue #3: PointPillars through both stages, on the real KITTI frame, via the real CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from codegen.configs import resolve_config
from codegen.errors import ExportError
from conftest import CONFIG, REPO, cli, frame_path

COMMITTED = (
    REPO / "generated" / "wrapper_pointpillars_hv_secfpn_8xb6_160e_kitti_3d_car.py"
)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ config resolution


@pytest.mark.parametrize(
    "spec",
    [
        CONFIG,
        CONFIG + ".py",
        "mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py",
        "configs/pointpillars/hv_pointpillars_secfpn_6x8_160e_kitti-3d-car.py",
        "hv_pointpillars_secfpn_6x8_160e_kitti-3d-car",
    ],
)
def test_config_forms_resolve_to_the_shipped_file(spec):
    resolved = resolve_config(spec)
    assert resolved.path.name == CONFIG + ".py"
    assert (
        resolved.ref
        == "mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py"
    )
    legacy = "hv_pointpillars" in spec
    assert (resolved.note is not None) == legacy
    if legacy:
        assert "mapped" in resolved.note and CONFIG in resolved.note


def test_legacy_names_come_from_the_metafiles():
    # a second family, to show the mapping is derived, not hand-written for PointPillars
    resolved = resolve_config(
        "configs/centerpoint/centerpoint_02pillar_second_secfpn_circlenms_4x8_cyclic_20e_nus.py"
    )
    assert (
        resolved.path.name
        == "centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"
    )
    assert (
        resolve_config("dv_second_secfpn_6x8_80e_kitti-3d-car").path.name
        == "second_dv_secfpn_8xb6-80e_kitti-3d-car.py"
    )


@pytest.mark.parametrize(
    "spec",
    ["no_such_model_config", "configs/nope/missing.py", "mmdet3d::nope/missing.py"],
)
def test_unknown_config_is_an_export_error(spec):
    with pytest.raises(ExportError):
        resolve_config(spec)


@pytest.mark.parametrize(
    "spec, channels",
    [
        (CONFIG, ["x", "y", "z", "intensity"]),
        # SUN RGB-D and ScanNet files hold x, y, z, r, g, b; VoteNet keeps x, y, z and adds
        # the height above the floor (shift_height), Group-Free 3D keeps x, y, z only
        ("votenet_8xb16_sunrgbd-3d", ["x", "y", "z", "height"]),
        ("votenet_8xb8_scannet-3d", ["x", "y", "z", "height"]),
        ("groupfree3d_head-L6-O256_4xb8_scannet-seg", ["x", "y", "z"]),
        (
            "centerpoint_voxel01_second_secfpn_8xb4-cyclic-20e_nus-3d",
            ["x", "y", "z", "intensity", "ring/time"],
        ),
        ("pgd_r101-caffe_fpn_head-gn_16xb2-1x_nus-mono3d", []),
    ],
)
def test_point_columns_follow_the_test_pipeline(spec, channels):
    from mmengine.config import Config

    from codegen.sample import point_channels

    assert point_channels(Config.fromfile(resolve_config(spec).path)) == channels


# ------------------------------------------------------------------ analysis of the real sample


@pytest.fixture(scope="module")
def generated():
    frame_path("KittiDataset")
    from codegen.generate import generate

    return generate(CONFIG, device="cpu")


def test_analyzer_describes_the_real_kitti_sample(generated):
    a = generated.analysis
    used = a.used_inputs
    assert [t.name for t in used] == ["voxels", "num_points", "coors"]
    assert [t.path for t in used] == [
        "inputs.voxels.voxels",
        "inputs.voxels.num_points",
        "inputs.voxels.coors",
    ]
    voxels, num_points, coors = used
    assert voxels.shape[1:] == [32, 4] and voxels.dtype == "float32"
    assert (
        num_points.dtype == "int32" and coors.dtype == "int32" and coors.shape[1] == 4
    )
    # 17,238 KITTI points fall into 3,945 pillars with the config's grid and range
    assert voxels.shape[0] == num_points.shape[0] == coors.shape[0] == 3945
    assert a.dynamic_dims() == {
        "num_voxels": {"voxels": 0, "num_points": 0, "coors": 0}
    }
    assert (
        "intensity" in voxels.description
        and "batch index, z, y, x" in coors.description
    )
    # the raw cloud is in the pytree but not a wrapper input
    points = next(t for t in a.inputs if t.path == "inputs.points.0")
    assert not points.used and points.shape == [16897, 4]
    constants = {c.path: c.value for c in a.constants}
    assert constants["data_samples.0.metainfo.box_type_3d"] == "LiDARInstance3DBoxes"
    assert constants["data_samples.0.metainfo.lidar_path"].endswith("000008.bin'")
    assert [(o.name, o.shape) for o in a.outputs] == [
        ("cls_score", [1, 2, 248, 216]),
        ("bbox_pred", [1, 14, 248, 216]),
        ("dir_cls_pred", [1, 4, 248, 216]),
    ]


def test_committed_wrapper_is_current_and_readable(generated):
    assert COMMITTED.read_text() == generated.source
    src = generated.source
    assert src.startswith("# @generated by mmdet3d-export")
    assert resolve_config(CONFIG).sha256 in src.splitlines()[0]
    assert "def forward(self, voxels: Tensor, num_points: Tensor, coors: Tensor)" in src
    assert (
        '"voxels": {"voxels": voxels, "num_points": num_points, "coors": coors}' in src
    )


def test_generated_wrapper_runs_and_equals_the_original_model(generated):
    from codegen.export import import_wrapper

    module = import_wrapper(COMMITTED)
    wrapper = module.ExportWrapper(generated.model)
    inputs = module.flat_inputs(generated.samples[0].data)
    with torch.no_grad():
        patched = wrapper(**{k: v.clone() for k, v in inputs.items()})
        wrapper.patched = False
        original = wrapper(**{k: v.clone() for k, v in inputs.items()})
    # not bit-exact: the patched scatter applies the backbone's first conv with its BatchNorm
    # folded in, to the pillar rows (ops.scatter.scatter_conv_to_bev), which rounds differently
    for p, o in zip(patched, original):
        torch.testing.assert_close(p, o, rtol=1e-5, atol=1e-5 * o.abs().max().item())


def test_generation_is_byte_identical_across_hash_seeds(tmp_path):
    outs = []
    for seed in ("0", "4242"):
        target = tmp_path / f"w{seed}.py"
        proc = cli(
            "generate",
            "--config",
            CONFIG,
            "--device",
            "cpu",
            "--output",
            str(target),
            env={"PYTHONHASHSEED": seed},
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(target.read_bytes())
    assert outs[0] == outs[1] == COMMITTED.read_bytes()


def test_check_catches_a_hand_edited_wrapper(tmp_path):
    edited = tmp_path / "wrapper.py"
    edited.write_text(COMMITTED.read_text().replace("BATCH_SIZE = 1", "BATCH_SIZE = 2"))
    proc = cli(
        "generate",
        "--config",
        CONFIG,
        "--device",
        "cpu",
        "--output",
        str(edited),
        "--check",
    )
    assert proc.returncode == 1
    assert "-BATCH_SIZE = 2" in proc.stdout and "+BATCH_SIZE = 1" in proc.stdout
    assert edited.read_text().count("BATCH_SIZE = 2") == 1  # --check never writes


# ------------------------------------------------------------------ end to end


def test_one_shot_writes_every_artifact(exported):
    out, proc = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "model.pt2",
            "model.onnx",
            "metadata.json",
            "inputs.npz",
            "validation.txt",
            COMMITTED.name,
        ]
    )
    # the one-shot's wrapper is the committed one
    assert (out / COMMITTED.name).read_text() == COMMITTED.read_text()
    # no CUDA here: one warning line, then cpu
    assert sum("falling back to cpu" in line for line in proc.stderr.splitlines()) == 1
    assert not list(out.parent.glob(".*staging*"))


def test_metadata_describes_the_export(exported):
    out, _ = exported
    meta = json.loads((out / "metadata.json").read_text())
    assert (
        meta["model_config"]
        == "mmdet3d::pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py"
    )
    assert meta["checkpoint"] is None and meta["model_type"] == "VoxelNet"
    info = meta["export_info"]
    assert info["total_inputs"] == 3
    assert info["input_structure"]["inputs"]["voxels"]["voxels"].startswith(
        "Tensor[3945, 32, 4]"
    )
    details = {d["path"]: d for d in info["tensor_details"]}
    assert details["inputs.voxels.voxels"]["shape"] == ["num_voxels", 32, 4]
    assert (
        details["inputs.voxels.coors"]["dtype"] == "int32"
        and details["inputs.voxels.coors"]["description"]
    )
    assert [o["name"] for o in meta["outputs"]] == [
        "cls_score",
        "bbox_pred",
        "dir_cls_pred",
    ]
    assert meta["dynamic_dims"]["num_voxels"]["inputs"] == {
        "voxels": 0,
        "num_points": 0,
        "coors": 0,
    }
    assert meta["onnx_opset"] >= 18 and meta["versions"]["torch"].startswith("2.13")
    assert meta["validation"]["passed"] is True
    sizes = {r["size"] for r in meta["validation"]["rows"]}
    assert sizes == {3945, 3120}  # two different voxel counts, one export


def test_exported_graphs_match_the_eager_model_exactly_enough(exported):
    out, _ = exported
    meta = json.loads((out / "metadata.json").read_text())
    worst = meta["validation"]["max_abs_diff"]
    assert worst["pt2"] < 1e-7  # measured 3.7e-9 (the folded first conv, see above)
    assert worst["onnx"] < 1e-6  # measured 3.7e-9
    text = (out / "validation.txt").read_text()
    assert "PASSED" in text and "✗" not in text


def test_onnx_is_checker_clean_with_named_dynamic_axes(exported):
    out, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert dims == {
        "voxels": ["num_voxels", 32, 4],
        "num_points": ["num_voxels"],
        "coors": ["num_voxels", 4],
    }
    assert [o.name for o in model.graph.output] == [
        "cls_score",
        "bbox_pred",
        "dir_cls_pred",
    ]
    assert (
        max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
        >= 18
    )


def test_onnx_optimiser_keeps_tiny_epsilons(tmp_path):
    """PointNet++ feature propagation computes ``1 / (dist + 1e-8)``; onnxscript's no-op rules
    (constant matched within 1e-8) turn it into ``1 / dist``, which is inf at a sampled point.
    The export runs the optimiser without them."""
    import onnxruntime as ort

    from codegen.export import exact_noop_rules

    class Recip(torch.nn.Module):
        def forward(self, dist):
            return 1.0 / (dist + 1e-8)

    program = torch.export.export(Recip(), (torch.ones(4),))
    with exact_noop_rules():
        torch.onnx.export(
            program, (), str(tmp_path / "r.onnx"), dynamo=True, optimize=True
        )
    session = ort.InferenceSession(
        str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {session.get_inputs()[0].name: np.zeros(4, np.float32)})
    np.testing.assert_allclose(got, np.full(4, 1e8, np.float32), rtol=1e-6)


def test_dynamic_voxel_count_on_a_third_size(exported):
    """A voxel count neither export nor validation used: reloaded PT2 and ORT vs the original."""
    import onnxruntime as ort

    from codegen.export import import_wrapper

    out, _ = exported
    module = import_wrapper(out / COMMITTED.name)
    wrapper = module.build()
    inputs = module.flat_inputs(
        __import__("codegen.sample", fromlist=["x"])
        .sample_frame(wrapper.model, module.FRAME, variant=3)
        .data
    )
    n = inputs["voxels"].shape[0]
    assert n not in (3945, 3120)
    args = [inputs[k] for k in module.INPUT_NAMES]
    wrapper.patched = False
    with torch.no_grad():
        ref = wrapper(*[a.clone() for a in args])
        pt2 = torch.export.load(str(out / "model.pt2")).module()(
            *[a.clone() for a in args]
        )
    session = ort.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {k: a.numpy() for k, a in zip(module.INPUT_NAMES, args)})
    for r, p, o in zip(ref, pt2, got):
        assert r.shape == p.shape == o.shape
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o, r.numpy(), atol=1e-5, rtol=1e-5)


def test_inputs_npz_reproduces_the_check(exported):
    out, _ = exported
    saved = np.load(out / "inputs.npz")
    assert sorted(saved.files) == ["coors", "num_points", "voxels"]
    assert saved["voxels"].shape == (3945, 32, 4)
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    outs = session.run(None, {k: saved[k] for k in saved.files})
    assert [o.shape for o in outs] == [
        (1, 2, 248, 216),
        (1, 14, 248, 216),
        (1, 4, 248, 216),
    ]


def test_export_subcommand_needs_nothing_but_the_wrapper(tmp_path):
    frame_path("KittiDataset")
    out = tmp_path / "from_wrapper"
    proc = cli(
        "export",
        str(COMMITTED),
        "--output-dir",
        str(out),
        "--format",
        "onnx",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "metadata.json", "inputs.npz", "validation.txt", COMMITTED.name]
    )
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta["formats"]) == ["onnx"] and meta["validation"]["passed"]


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path):
    """A checkpoint saved here, exported, equals the eager model loaded by mmengine."""
    frame_path("KittiDataset")
    from mmdet3d.apis import init_model
    from mmengine.runner import save_checkpoint

    from codegen import sample as smp

    model = smp.load_model(CONFIG)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 1.5)
    ckpt = tmp_path / "pointpillars_trained.pth"
    save_checkpoint({"state_dict": model.state_dict(), "meta": {"epoch": 3}}, str(ckpt))

    out = tmp_path / "with_ckpt"
    proc = cli(
        "--config",
        CONFIG,
        "--checkpoint",
        str(ckpt),
        "--output-dir",
        str(out),
        "--format",
        "both",
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["checkpoint"] == str(ckpt) and meta["validation"]["passed"]

    reference = init_model(str(resolve_config(CONFIG).path), str(ckpt), device="cpu")
    saved = np.load(out / "inputs.npz")
    batch = {"voxels": {k: torch.from_numpy(saved[k]) for k in saved.files}}
    with torch.no_grad():
        expected = [t[0].numpy() for t in reference._forward(batch)]
    pt2 = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        got = pt2(
            *[torch.from_numpy(saved[k]) for k in ("voxels", "num_points", "coors")]
        )
    for e, g in zip(expected, got):  # the folded first conv: 5.6e-5 on outputs up to ~7
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=2e-5 * np.abs(e).max())
    # and the weights really are the checkpoint's: a random model gives other outputs
    assert not np.allclose(
        expected[0], smp.load_model(CONFIG)._forward(batch)[0][0].detach().numpy()
    )


# ------------------------------------------------------------------ bad inputs


def _assert_clean_failure(proc, out: Path, needle: str):
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "half-written output left behind"
    assert not list(out.parent.glob(f".{out.name}*")), "staging left behind"


def test_missing_config_file(tmp_path):
    out = tmp_path / "out"
    proc = cli("--config", str(tmp_path / "nope.py"), "--output-dir", str(out))
    _assert_clean_failure(proc, out, "config file not found")


def test_unknown_config_name(tmp_path):
    out = tmp_path / "out"
    proc = cli("--config", "pointpillars_does_not_exist", "--output-dir", str(out))
    _assert_clean_failure(proc, out, "unknown config name")


def test_corrupt_config_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("model = dict(type='VoxelNet',\n")
    out = tmp_path / "out"
    proc = cli("--config", str(bad), "--output-dir", str(out))
    _assert_clean_failure(proc, out, "cannot load config")


def test_corrupt_checkpoint(tmp_path):
    ckpt = tmp_path / "corrupt.pth"
    ckpt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    out = tmp_path / "out"
    proc = cli("--config", CONFIG, "--checkpoint", str(ckpt), "--output-dir", str(out))
    _assert_clean_failure(proc, out, "not a readable torch checkpoint")


def test_checkpoint_of_another_model(tmp_path):
    ckpt = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.conv.weight": torch.zeros(3, 3)}}, ckpt)
    out = tmp_path / "out"
    proc = cli("--config", CONFIG, "--checkpoint", str(ckpt), "--output-dir", str(out))
    _assert_clean_failure(proc, out, "does not fit the model")


@pytest.mark.parametrize(
    "content, needle",
    [
        (np.zeros((0, 4), np.float32), "empty point cloud"),
        (np.array([[1.0, 2.0, np.nan, 0.5]] * 100, np.float32), "NaN"),
        (np.zeros(4 * 100 + 3, np.float32), "not a multiple"),
    ],
    ids=["empty", "nan", "truncated"],
)
def test_bad_point_clouds(tmp_path, content, needle):
    frame = tmp_path / "cloud.bin"
    content.tofile(frame)
    out = tmp_path / "out"
    proc = cli("--config", CONFIG, "--frame", str(frame), "--output-dir", str(out))
    _assert_clean_failure(proc, out, needle)


def test_failure_keeps_an_existing_output_dir_intact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous export")
    frame = tmp_path / "cloud.bin"
    np.zeros((0, 4), np.float32).tofile(frame)
    proc = cli("--config", CONFIG, "--frame", str(frame), "--output-dir", str(out))
    assert proc.returncode != 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "previous export"


def test_test_time_augmentation_pipeline_gives_its_first_view():
    """Configs whose test pipeline ends in MultiScaleFlipAug3D with the packing inside (SECOND
    Waymo) pack a list of views; the sample is the first (unflipped, first scale)."""
    from codegen import sample as smp

    frame_path("KittiDataset")
    model = smp.load_model("second_hv_secfpn_sbn-all_16xb2-2x_waymoD5-3d-3class")
    s = smp.sample_frame(model, "kitti/000008.bin")
    assert s.data["inputs"]["voxels"]["voxels"].shape[0] > 0
    assert s.data["data_samples"][0].metainfo["lidar_path"].endswith("000008.bin")
