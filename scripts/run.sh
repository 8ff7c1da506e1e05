#!/usr/bin/env bash
# One entry point from a fresh clone: installs the pinned environment into .venv (skipped when
# already done), then runs the job.
#   bash scripts/run.sh demo [flags]   export PointPillars on the KITTI frame into ./exported_models
#   bash scripts/run.sh test [args]    generate --check + the test suite (what CI runs)
#   bash scripts/run.sh bench          benchmarks (bench/), results in docs/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
"$PY" scripts/install.py
job="${1:-demo}"
shift || true
case "$job" in
  demo)
    exec .venv/bin/mmdet3d-export --config pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car "$@" ;;
  test)
    .venv/bin/mmdet3d-export generate --check --device cpu
    exec .venv/bin/python -m pytest -m "not slow" "$@" ;;
  bench)
    exec .venv/bin/python bench/pointpillars.py "$@" ;;
  *)
    echo "usage: bash scripts/run.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
