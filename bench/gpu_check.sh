#!/usr/bin/env bash
# The GPU checks of the device path (`--device cuda`, ckpt_core/pipeline/device.py): the CUDA
# tests of tests/test_device_path.py, then bench/gpu.py (a ~1 GB DCP checkpoint, cuda vs cpu:
# wall, peak host RSS, peak device memory, byte-identity). About 3-5 minutes on one H100.
#
#   bench/gpu_check.sh                 # from any directory; exits 0 with a skip line without a GPU
#   PYTHON=/opt/x/bin/python3 bench/gpu_check.sh
#   GPU_CHECK_LAYERS=4 bench/gpu_check.sh   # a smaller bench checkpoint (default 20 layers, ~1 GB)
#
# Python: $PYTHON, else .venv/bin/python, else python3 - the first whose torch sees CUDA. A
# fresh machine needs torch (CUDA build), safetensors, fsspec, huggingface_hub, numpy,
# transformers and pytest; prefect and deepspeed are not needed (the DeepSpeed cases skip
# unless .fixtures/deepspeed-* is carried along). Carrying .fixtures/ saves regenerating the
# DCP fixture (torchrun, ~30 s).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY="$candidate"
        break
    fi
done
if [ -z "$PY" ]; then
    seen="no Python with torch"
    for candidate in "${PYTHON:-}" .venv/bin/python python3; do
        [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
        if found=$("$candidate" -c "import torch; print('$candidate: torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null); then
            seen="$found"
            break
        fi
    done
    echo "gpu_check: skipped: no CUDA GPU visible to torch here ($seen); nothing was run"
    exit 0
fi
if ! "$PY" -c "import safetensors, fsspec, huggingface_hub, numpy, transformers, pytest" 2>/dev/null; then
    echo "gpu_check: $PY lacks a package the checks need:"
    "$PY" -c "import safetensors, fsspec, huggingface_hub, numpy, transformers, pytest"
    exit 1
fi

export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__)"

echo "== tests/test_device_path.py (the cuda cases and the device code placed on the CPU)"
# --noconftest: tests/conftest.py sets up Prefect, which these tests do not use.
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/test_device_path.py -rs
tests_rc=$?

echo "== bench (bench/gpu.py)"
timeout 300 "$PY" bench/gpu.py --repeat 2 --layers "${GPU_CHECK_LAYERS:-20}"
bench_rc=$?

echo "gpu_check: tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
