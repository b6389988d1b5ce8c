#!/usr/bin/env bash
# The GPU check of the CUDA kernels in one go, sized for a lent GPU machine (under 8 minutes): the
# GPU tests (tests/test_cuda.py) and the kernel benchmark (tools/bench_gpu.py), their output under
# $OUT (default /tmp/gpu_check).
#
#   tools/gpu_check.sh --prepare   # here, before: builds libbayesq_cuda.so with this machine's nvcc and
#                                  # puts pytest under build/gpu_pylib; prints the paths to carry
#   tools/gpu_check.sh             # there: uses the carried library (or builds it, where nvcc is)
#
# The GPU machine has torch with CUDA, numpy and cupy, not necessarily onnx or pytest, and nothing can
# be downloaded there: the tests and the benchmark import only numpy and torch from outside the tree,
# and pytest runs without tests/conftest.py (which imports onnx).
set -euo pipefail
cd "$(dirname "$0")/.."
LIB=bayesq_onnx/runtime/libbayesq_cuda.so

build() {
    cmake -S custom_ops -B build/gpu -DCMAKE_BUILD_TYPE=Release -DBAYESQ_CUDA=ON >build/gpu.log 2>&1
    cmake --build build/gpu -j"$(nproc)" --target bayesq_cuda >>build/gpu.log 2>&1 \
        || { grep -E 'error|spill' build/gpu.log | head -20; echo "gpu_check: build failed (build/gpu.log)"; exit 2; }
    cp build/gpu/libbayesq_cuda.so "$LIB"
}

mkdir -p build
if [[ "${1:-}" == "--prepare" ]]; then
    command -v nvcc >/dev/null || { echo "gpu_check: no nvcc here"; exit 2; }
    build
    python -m pip install -q --target build/gpu_pylib pytest
    echo "carry: $LIB build/gpu_pylib"
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import pytest" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PWD/build/gpu_pylib"
if [[ ! -f "$LIB" ]]; then
    command -v nvcc >/dev/null || { echo "gpu_check: $LIB not carried and no nvcc to build it"; exit 2; }
    build
fi
(nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true) | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/device.txt" || true
rc=0
timeout 240 python -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt" || rc=1
timeout 240 python tools/bench_gpu.py --csv "$OUT/bench_gpu.csv" 2>&1 | tee "$OUT/bench_gpu.txt" || rc=1
exit $rc
