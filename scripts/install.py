"""Create ``.venv`` and install the pinned environment from pyproject.toml (stdlib only).

Idempotent: a stamp holding the sha256 of pyproject.toml skips the work on a second run.
Stages (all versions come from pyproject.toml):
  1. build tools + torch (mmcv compiles its ops against the installed torch);
  2. every other dependency in one pip call, numpy<2 kept by the pins; mmcv comes from
     ``../shared/wheels`` when a matching prebuilt wheel is there, otherwise from its sdist
     (MMCV_WITH_OPS=1, about 6 minutes on 2 cores);
  3. mmdet / mmdet3d / nuscenes-devkit with ``--no-deps``;
  4. this project, editable, with ``--no-deps``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("MMDET3D_EXPORT_VENV", ROOT / ".venv"))
STAMP = VENV / ".mmdet3d-export-install"
WHEELS = ROOT.parent / "shared" / "wheels"


def log(msg: str) -> None:
    print(f"[install] {msg}", flush=True)


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    log(" ".join(cmd[3:]))
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print(f"error: Python 3.11 is required (this is {sys.version.split()[0]})", file=sys.stderr)
        return 2
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    digest = hashlib.sha256(pyproject).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        log(f"environment in {VENV} is up to date (delete {STAMP.name} to force)")
        return 0
    spec = tomllib.loads(pyproject.decode())
    install = spec["tool"]["mmdet3d-export"]["install"]
    build, no_deps = install["build"], install["no-deps"]
    skip = {r.split("==")[0].lower() for r in build + no_deps}
    deps = [r for r in spec["project"]["dependencies"] if r.split("==")[0].lower() not in skip]

    start = time.monotonic()
    if not (VENV / "bin" / "python").exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(install["constraints"] + build + no_deps) + "\n")
        constraints = f.name
    try:
        pip(*build)
        env = dict(os.environ, MMCV_WITH_OPS="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        env.setdefault("CFLAGS", "-O1 -g0")
        env.setdefault("CXXFLAGS", "-O1 -g0")
        extra = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
        if not extra:
            log("no prebuilt mmcv wheel folder: mmcv 2.1.0 compiles from source (~6 min on 2 cores)")
        pip("--no-build-isolation", "-c", constraints, *extra, *deps, env=env)
        pip("--no-deps", *no_deps)
        pip("--no-deps", "--no-build-isolation", "-e", str(ROOT))
    finally:
        os.unlink(constraints)
    STAMP.write_text(digest + "\n")
    log(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
