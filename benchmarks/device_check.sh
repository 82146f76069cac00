#!/usr/bin/env bash
# The device check, run first whenever a GPU is at hand (one command, under 8 minutes on one H200,
# no network): the CUDA-marked tests, then benchmarks/device_check.py's table in one process.
# Without a GPU it runs the table's CPU part (tiny-world, seconds), so that it cannot rot.
#
#   bash benchmarks/device_check.sh            # from the repository root
#
# Results go to $OUT when it is set, else benchmarks/results/ (device_check.{json,md}, the tests'
# log). It needs the core only (torch, numpy, safetensors, typer, tqdm, pillow); the tests need
# pytest too: where it is missing, bring its wheels (pytest, pluggy, iniconfig, packaging, pygments)
# in .whl/ and they are installed from there, offline, else the tests are skipped and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: the CPU part only"
    "$PYTHON" benchmarks/device_check.py --cpu --out "$OUT_DIR"
    exit $?
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
if ! "$PYTHON" -c "import pytest" 2>/dev/null && ls .whl/pytest-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/device-check-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/device-check-site"
fi
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    # The core's device tests, and the engine's CUDA-marked ones where the service's packages are here.
    timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= tests/qarvd_core/test_device.py \
        2>&1 | tee "$OUT_DIR/device_check_tests.log" || status=1
    if "$PYTHON" -c "import fastapi, pydantic_settings" 2>/dev/null; then
        timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= -m cuda tests/service/engine/test_device.py \
            2>&1 | tee -a "$OUT_DIR/device_check_tests.log" || status=1
    else
        echo "fastapi or pydantic-settings missing: the engine's CUDA tests did not run" | tee -a "$OUT_DIR/device_check_tests.log"
    fi
else
    echo "pytest is not installed: the CUDA-marked tests did not run" | tee "$OUT_DIR/device_check_tests.log"
fi
timeout 360 "$PYTHON" benchmarks/device_check.py --out "$OUT_DIR" || status=1
exit $status
