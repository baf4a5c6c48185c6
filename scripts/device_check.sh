#!/usr/bin/env bash
# GPU proof on a lent machine, in priority order, within one short device session (the lent
# H100/H200 gives 15 minutes in all, start-up included): a few steps of each configuration with the
# official-numerics mode (fp32, text padded to 64, math attention, unfused AdamW) as the in-run 1.0x
# reference, then the loader and the GPU tests. Every benchmark row is one JSON line in
# $OUT/bench.jsonl (samples/s, MFU, peak GiB, device, torch, commit); logs and a summary beside it.
#   bash scripts/device_check.sh               # BUDGET=600 s of commands by default
#   BUDGET=300 bash scripts/device_check.sh    # fewer items: later ones are skipped, not cut
# Record the results in docs/benchmarks.md with the device and the date. Without a .git folder on the
# machine, pass the commit: ONEREF_GIT_COMMIT=$(git rev-parse --short HEAD) bash scripts/device_check.sh
# Wheels the machine lacks (hydra-core, omegaconf, antlr4-python3-runtime, wandb, pycocotools, ...)
# can be carried in ./wheels; they are installed from there without network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/oneref_device}
BUDGET=${BUDGET:-600}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d wheels ]; then
    python -m pip install -q --no-index --find-links wheels wheels/*.whl > "$OUT/pip.log" 2>&1
fi
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# item NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and the budget left, logs to
# $OUT/NAME.log; skipped when under 45 s of the budget remain.
item() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 45)); then
        echo "$name: skipped (budget)" >> "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc=$? at $(($(date +%s) - START)) s" >> "$SUMMARY"
}

B=(python scripts/benchmark.py)
J=(--out "$OUT/bench.jsonl")
S=(--steps 8 --warmup 3)
# 1. REC-B training at batch 64: official, then ours (bf16, fused AdamW) with text 64 and realistic
item rec_b_train 150 "${B[@]}" train --size base --task rec --batch 64 --text 64 realistic "${S[@]}" "${J[@]}"
# 2. REC-B, the compiled path: per-layer compile, text buckets (static shapes), FlexAttention
item rec_b_train_compile 180 "${B[@]}" train --size base --task rec --batch 64 --modes ours --compile \
    --text realistic --text-buckets 16 32 64 --attention flex --steps 8 --warmup 4 "${J[@]}"
# 3. RES-B training at batch 64
item res_b_train 120 "${B[@]}" train --size base --task res --batch 64 --text realistic "${S[@]}" "${J[@]}"
# 4. REC-L training at batch 32
item rec_l_train 150 "${B[@]}" train --size large --task rec --batch 32 --text realistic "${S[@]}" "${J[@]}"
# 5. REC-B inference (the test step: forward and metrics) at batch 128
item rec_b_infer 90 "${B[@]}" infer --size base --task rec --batch 128 --text realistic "${S[@]}" "${J[@]}"
# 6. MRefM-B pretraining step (MIM and MLM steps alternate; VQ-KD targets included, a random VQ-KD)
item mrefm_b 120 "${B[@]}" mrefm --size base --batch 64 "${S[@]}" "${J[@]}"
# 7. memory: REC-B with activation checkpointing (peak <= 16 GiB target)
item rec_b_train_ckpt 90 "${B[@]}" train --size base --task rec --batch 64 --modes ours --grad-ckpt \
    --text realistic "${S[@]}" "${J[@]}"
# 8. the loader: samples/s per worker and with 8 workers (its CPUs, not the GPU)
item data 90 "${B[@]}" data --samples 512 --loader-workers 8 "${J[@]}"
# 9. the GPU tests (bf16 vs fp32, compile + checkpointing, FlexAttention, no host syncs, an FSDP
#    step with a save and a reload on one device)
item gpu_tests 180 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
# 10. prediction: queries/s of the CLI for OneRef-B (scripts/predict_bench.sh)
item predict_b 120 bash scripts/predict_bench.sh

# 11. CUDA graphs (compile mode reduce-overhead, static shapes from the buckets)
item rec_b_train_cudagraphs 150 "${B[@]}" train --size base --task rec --batch 64 --modes ours --compile \
    --compile-mode reduce-overhead --text realistic --text-buckets 16 32 64 --steps 8 --warmup 4 "${J[@]}"

cat "$SUMMARY"
python - "$OUT/bench.jsonl" <<'EOF'
import json, sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
# the official row of the same bench, size, task and batch is the 1.0x of every row of this file
ref = {
    (r["command"], r["size"], r["task"], r["batch"]): r["samples_per_s"]
    for r in rows
    if r.get("mode") == "official" and "samples_per_s" in r
}
for r in rows:
    base = ref.get((r.get("command"), r.get("size"), r.get("task"), r.get("batch")))
    if base and "samples_per_s" in r:
        r["speedup_vs_official"] = r["samples_per_s"] / base
    if r.get("command") in ("train", "infer", "mrefm"):
        keys = ("command", "mode", "size", "task", "batch", "text", "compile", "attention", "grad_ckpt")
        print(" ".join(f"{k}={r.get(k)}" for k in keys), "->", {
            k: round(r[k], 3) if isinstance(r.get(k), float) else r.get(k)
            for k in ("samples_per_s", "mfu", "peak_mem_gib", "speedup_vs_official", "error")
        })
EOF
