#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine: environment, the GPU tests, and the model benchmark
# (ours vs the official numerics, compile, activation checkpointing) for OneRef-B and -L at 384 px.
# Everything goes under $OUT (default /tmp/oneref_device); read bench_model_gpu.json afterwards and
# record it in docs/benchmarks.md with the device and the date.
#   bash scripts/device_check.sh            # about 5 minutes on one H100
# Wheels the machine lacks (hydra-core, omegaconf, antlr4-python3-runtime, wandb, pycocotools, ...)
# can be carried in ./wheels; they are installed from there without network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/oneref_device}
mkdir -p "$OUT"
export WANDB_MODE=disabled
if [ -d wheels ]; then
    python -m pip install -q --no-index --find-links wheels wheels/*.whl > "$OUT/pip.log" 2>&1
fi
python -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/pip.log" 2>&1 || python -m pip install -q --no-deps -e . >> "$OUT/pip.log" 2>&1
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
timeout 420 python scripts/benchmark.py model --sizes base large --modes official ours ours_compile ours_ckpt \
    --steps 10 --warmup 3 --out "$OUT/bench_model_gpu.json" > "$OUT/bench_model_gpu.log" 2>&1
echo "benchmark rc=$?" >> "$OUT/bench_model_gpu.log"
tail -n 3 "$OUT/gpu_tests.txt" "$OUT/bench_model_gpu.log"
