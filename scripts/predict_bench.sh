#!/usr/bin/env bash
# Queries/s of `python -m oneref.predict` for a randomly initialised OneRef-B at 384 px (speed does
# not depend on the weights): 1024 queries over 256 JPEG photos of 640 x 480; the last line of the
# CLI's output is the figure. Used by scripts/device_check.sh; DEVICE=cpu N=16 checks it on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PB=${OUT:-/tmp/oneref_device}/predict_bench
N=${N:-1024}
DEVICE=${DEVICE:-cuda}
python - "$PB" "$N" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from oneref.checkpoint import save_folder
from oneref.data.tokenizer import train_sentencepiece
from oneref.models.registry import create_model
root, n = Path(sys.argv[1]), int(sys.argv[2])
(root / "img").mkdir(parents=True, exist_ok=True)
words = "the red man woman dog cat on left right of a small big blue green car in front behind".split()
rng = np.random.default_rng(0)
spm = train_sentencepiece([" ".join(rng.choice(words, 8)) for _ in range(200)], root / "bench.spm")
torch.manual_seed(0)
model = create_model("base", img_size=384)
save_folder(root / "base384", model.state_dict(), model.cfg, task="rec", tokenizer=spm, overwrite=True)
y, x = np.mgrid[0:480, 0:640]
with open(root / "q.jsonl", "w") as f:
    for i in range(n):
        if i < 256:
            img = np.stack([(x + i) % 256, (2 * y) % 256, (x + y) % 256], -1).astype(np.uint8)
            Image.fromarray(img).save(root / "img" / f"{i:03d}.jpg", quality=90)
        f.write(json.dumps({"image": f"img/{i % 256:03d}.jpg", "text": " ".join(rng.choice(words, 6))}) + "\n")
PY
python -m oneref.predict ckpt_path="$PB/base384" inputs="$PB/q.jsonl" draw=false progress=false \
    batch_size=64 workers=8 device="$DEVICE" hydra.run.dir="$PB/run" 2>&1 | tail -n 1 | tee "$PB/speed.txt"
