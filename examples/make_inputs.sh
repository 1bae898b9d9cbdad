#!/usr/bin/env bash
# The inputs of examples/recipe.yaml and examples/pipeline.sh: a generated theta0, three fine-tuned
# checkpoints and two task vectors (seconds, no download). `make demo` runs it too (step 1).
#   examples/make_inputs.sh [DIR]      (default demo-out/arith, where examples/recipe.yaml looks)
# writes DIR/base.safetensors, DIR/ft1..3.safetensors and DIR/tv/ft1.tv.safetensors, DIR/tv/ft2.tv.safetensors.
# TVEDIT_EXAMPLE_SMALL=1 makes the tensors tiny (the tests use it).
set -euo pipefail
dir=${1:-demo-out/arith}
mkdir -p "$dir"
python - "$dir" "${TVEDIT_EXAMPLE_SMALL:-0}" <<'PY'
import sys, torch
from safetensors.torch import save_file
out, small = sys.argv[1], sys.argv[2] == "1"
d = 8 if small else 128
g = torch.Generator().manual_seed(0)
base = {"encoder.weight": torch.randn(2 * d, d, generator=g), "encoder.bias": torch.randn(2 * d, generator=g), "head.weight": torch.randn(10, 2 * d, generator=g)}
save_file(base, f"{out}/base.safetensors")
for i in (1, 2, 3):
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"{out}/ft{i}.safetensors")
PY
tvedit extract "$dir/ft1.safetensors" "$dir/ft2.safetensors" --base "$dir/base.safetensors" --out-dir "$dir/tv" --force --json > /dev/null
echo "wrote $dir/base.safetensors, $dir/ft{1,2,3}.safetensors, $dir/tv/ft{1,2}.tv.safetensors"
