"""Shared fixtures: real frames from ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codegen.sample import DEFAULT_FRAMES, data_root

REPO = Path(__file__).resolve().parent.parent
CONFIG = "pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car"  # the shipped default
WIDTH = {
    "KittiDataset": 4,
    "NuScenesDataset": 5,
    "SUNRGBDDataset": 6,
    "ScanNetDataset": 6,
}


def frame_path(dataset: str) -> Path:
    path = data_root() / DEFAULT_FRAMES[dataset]
    if not path.is_file():
        pytest.skip(
            f"real frame absent: {path} (set MMDET3D_EXPORT_DATA or provide ../shared/data)"
        )
    return path


def load_frame(dataset: str) -> np.ndarray:
    return np.fromfile(frame_path(dataset), dtype=np.float32).reshape(
        -1, WIDTH[dataset]
    )


def cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess (``timeout`` guards against hangs; raise it for
    models whose export takes longer on a loaded machine)."""
    return subprocess.run(
        [sys.executable, "-m", "codegen", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The one-shot export of the shipped default (PointPillars, KITTI frame, PT2 + ONNX)."""
    frame_path("KittiDataset")
    out = tmp_path_factory.mktemp("export") / "pointpillars"
    proc = cli("--config", CONFIG, "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="session")
def kitti_points() -> np.ndarray:
    """KITTI velodyne sweep 000008: [17238, 4] x, y, z, intensity."""
    return load_frame("KittiDataset")


@pytest.fixture(scope="session")
def nuscenes_points() -> np.ndarray:
    """nuScenes LIDAR_TOP sweep: [N, 5] x, y, z, intensity, ring."""
    return load_frame("NuScenesDataset")


@pytest.fixture(scope="session")
def sunrgbd_points() -> np.ndarray:
    """SUN RGB-D 000017 depth cloud: [N, 6] x, y, z, r, g, b."""
    return load_frame("SUNRGBDDataset")


@pytest.fixture(scope="session")
def scannet_points() -> np.ndarray:
    """ScanNet scene0000_00: [N, 6] x, y, z, r, g, b."""
    return load_frame("ScanNetDataset")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.manual_seed(0)
    yield
