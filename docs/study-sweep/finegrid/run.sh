#!/bin/bash
# The sparse vectors of the steps sweep (seed 0) merged again with an alpha grid ten times finer
# (0:0.1:0.0025) than the sweep's (0:1:0.025): does the grid's resolution explain sparse's merges?
# Needs the sweep's outputs in demo-out/sweep (tvedit study, examples/sweep.yaml, steps axis).
set -e
cd "$(dirname "$0")/../../.."
T=demo-out/cache/data/tasks
for s in 600 1500 3000; do  # from 600 steps on the sweep picked alpha <= 0.075
  P=demo-out/sweep/sweep/steps/$s; V=$P/runs/sparse/lr0.01/seed0
  tvedit evaluate $V/digits.safetensors $V/animals.safetensors $V/letters.safetensors $V/shapes.safetensors \
    --task digits=$T/digits --task animals=$T/animals --task letters=$T/letters --task shapes=$T/shapes \
    --protocol addition --grid 0:0.1:0.0025 --no-widen --base $P/theta0.safetensors --device cpu --json \
    --report docs/study-sweep/finegrid/sparse-$s.json > /dev/null
done
