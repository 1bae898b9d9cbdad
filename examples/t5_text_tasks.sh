#!/usr/bin/env bash
# Task arithmetic on a (tiny, randomly initialised) T5, offline, on CPU in a few minutes:
# init theta0 from a Hugging Face directory, fine-tune two JSONL text tasks (full and TaLoS sparse),
# evaluate task addition and negation by rank classification, and export the merged model as a
# Hugging Face directory. With a real model, pass its directory: examples/t5_text_tasks.sh WORKDIR HF_DIR
# TVEDIT_EXAMPLE_SMALL=1: 2 fine-tuning steps instead of 200 (a smoke run: the tests use it).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-t5-example}"
model="${2:-}"
mkdir -p "$work"
cd "$work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny models run fastest single-threaded

# A tiny T5 (ByT5 byte tokenizer: no download) and two tasks with a learnable rule.
python "$here/tests/tiny_t5.py" . >/dev/null
model="${model:-tiny-t5}"

tvedit init --model "$model" -o theta0.safetensors --force --json >/dev/null
tiny=(--steps 200 --batch-size 16 --lr 3e-3 --warmup 10)    # the T5 recipe defaults: lr 1e-4, batch 1024
[ "${TVEDIT_EXAMPLE_SMALL:-0}" = 1 ] && tiny=(--steps 2 --batch-size 4 --lr 3e-3 --warmup 0)
tvedit finetune -p theta0.safetensors --train first_letter --mode full "${tiny[@]}" --emit vector -o first_letter.tv.safetensors --force --json >/dev/null
tvedit finetune -p theta0.safetensors --train parity --mode sparse --density 0.2 --calib-batches 4 "${tiny[@]}" --emit vector -o parity.tv.safetensors --force --json >/dev/null

echo "== single-task accuracy (rank classification over each task's choices)"
tvedit evaluate first_letter.tv.safetensors --task first_letter=first_letter
tvedit evaluate parity.tv.safetensors --task parity=parity

echo "== task addition (alpha chosen on the validation splits)"
tvedit evaluate first_letter.tv.safetensors parity.tv.safetensors --protocol addition \
  --task first_letter=first_letter --task parity=parity

echo "== task negation of first_letter, parity as the control task"
tvedit evaluate first_letter.tv.safetensors --protocol negation --task first_letter=first_letter --control parity=parity

echo "== merge and export as a Hugging Face directory"
tvedit add first_letter.tv.safetensors parity.tv.safetensors --alpha 0.5 -o merged.safetensors --force --json >/dev/null
tvedit export-hf merged.safetensors -o merged-hf --force
python - <<'EOF'
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained("merged-hf")
tok = AutoTokenizer.from_pretrained("merged-hf")
print("loaded", type(model).__name__, "with", sum(p.numel() for p in model.parameters()), "parameters")
EOF
