#!/usr/bin/env bash
# End-to-end demo on generated checkpoints (runs offline, in seconds).
set -euo pipefail
out=${DEMO_OUT:-demo-out}
rm -rf "$out" && mkdir -p "$out"
python - "$out" <<'PY'
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
base = {"encoder.weight": torch.randn(256, 128, generator=g), "encoder.bias": torch.randn(256, generator=g), "head.weight": torch.randn(10, 256, generator=g)}
save_file(base, f"{out}/base.safetensors")
for i in (1, 2, 3):
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"{out}/ft{i}.safetensors")
PY
cd "$out"
echo "== extract three task vectors, halve them, and merge into theta0 with alpha 0.3 (one pipeline)"
tvedit extract ft1.safetensors ft2.safetensors ft3.safetensors --base base.safetensors \
  | tvedit scale - --by 0.5 \
  | tvedit add - --alpha 0.3 -o merged.safetensors --json > merged.json
tvedit info merged.safetensors
echo "== forget task 1: theta0 - tau1"
tvedit extract ft1.safetensors --base base.safetensors -o tau1.safetensors
tvedit negate tau1.safetensors -o neg1.safetensors
tvedit add neg1.safetensors -o forget1.safetensors
tvedit info neg1.safetensors
echo "demo finished: outputs in $out/"
