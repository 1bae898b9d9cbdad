#!/usr/bin/env bash
# Task arithmetic on a (tiny, randomly initialised) Llama-shaped causal LM, offline, on CPU in a few
# minutes: a tokenizer built locally, two JSONL text tasks fine-tuned in two regimes (attn, full),
# task addition, the merged model written as a Hugging Face directory and gated on accuracy and
# perplexity, the merge exported as a PEFT LoRA adapter, loaded by peft and imported back.
# Usage: examples/llm_tasks.sh [WORKDIR]      (needs the test extra for peft: pip install -e '.[test]')
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-llm-example}"
mkdir -p "$work"
cd "$work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# theta0: a tiny Llama (hidden 16, 2 layers, float32) with a 64-word WordLevel tokenizer; two tasks
# whose answer is a word of the input (learnable), and a plain-text file for perplexity.
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python - <<'EOF'
import json, random
from pathlib import Path
from tests.tiny_hf import write_tiny_llama

write_tiny_llama("tiny-llama", dtype="float32")
rng = random.Random(0)
def task(name, pick, choices):
    d = Path(name); d.mkdir(exist_ok=True)
    rows = []
    for _ in range(240):
        words = [rng.choice(choices)] + [f"w{rng.randint(20, 40)}" for _ in range(rng.randint(1, 4))] + [rng.choice(choices)]
        rows.append({"input": " ".join(words), "choices": choices, "label": choices.index(pick(words))})
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
task("first", lambda w: w[0], ["w10", "w11"])   # the answer is the first word
task("last", lambda w: w[-1], ["w12", "w13"])   # the answer is the last word
Path("text.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{rng.randint(4, 60)}" for _ in range(12))}) + "\n" for _ in range(20)))
EOF

tvedit init --model tiny-llama -o theta0.safetensors --force --json >/dev/null
# TVEDIT_EXAMPLE_SMALL=1 (the test suite): 4 steps instead of 120, gates at 0 (an untrained model)
steps=120 bar=0.5
if [ -n "${TVEDIT_EXAMPLE_SMALL:-}" ]; then steps=4 bar=0; fi
tiny=(--steps "$steps" --batch-size 16 --lr 3e-3 --warmup 2 --device cpu)
tvedit finetune -p theta0.safetensors --train first --mode attn "${tiny[@]}" --emit vector -o first.tv.safetensors --force --json >/dev/null
tvedit finetune -p theta0.safetensors --train last --mode full "${tiny[@]}" --emit vector -o last.tv.safetensors --force --json >/dev/null

echo "== single-task accuracy (summed log-likelihood of each choice, lm-eval's acc)"
tvedit evaluate first.tv.safetensors --task first=first --device cpu
tvedit evaluate last.tv.safetensors --task last=last --device cpu

echo "== task addition (alpha chosen on the validation splits)"
tvedit evaluate first.tv.safetensors last.tv.safetensors --protocol addition --task first=first --task last=last --device cpu

echo "== the merge as a Hugging Face directory, evaluated as it is and gated (exit 7 below the bar)"
tvedit add first.tv.safetensors last.tv.safetensors --alpha 0.5 -o merged/ --like tiny-llama --force --json >/dev/null
tvedit evaluate merged --task first=first --task last=last --device cpu --min-accuracy first=$bar --min-accuracy last=$bar
tvedit evaluate merged --task text=text.jsonl --metric perplexity --max-perplexity text=1000 --device cpu

echo "== the merged vector as a PEFT LoRA adapter (full rank of the tiny model: exact), loaded by peft"
tvedit add first.tv.safetensors last.tv.safetensors --alpha 0.5 --emit vector -o merged.tv.safetensors --force --json >/dev/null
tvedit export-lora merged.tv.safetensors --base tiny-llama --rank 16 --modules-to-save -o merged-lora --force
python - <<'EOF'
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("tiny-llama"), "merged-lora").merge_and_unload()
want = load_file("merged/model.safetensors")
diff = max(float((model.state_dict()[k] - v).abs().max()) for k, v in want.items())
print(f"peft merge of merged-lora vs merged/: max |difference| {diff:.2e} over {len(want)} tensors")
EOF
tvedit import merged-lora -o roundtrip.tv.safetensors --force
