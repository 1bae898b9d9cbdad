#!/usr/bin/env bash
# A task-arithmetic pipeline with no intermediate file names: extract -> scale -> add.
# Usage: examples/pipeline.sh BASE FT1 FT2 [...]   (writes merged.safetensors, replacing an earlier one)
# The intermediates go to the scratch directory and are removed whatever happens; a failing stage
# fails the script (pipefail).
set -euo pipefail
base=$1; shift
tvedit extract "$@" --base "$base" \
  | tvedit scale - --by 0.5 \
  | tvedit add - --alpha 0.3 -o merged.safetensors --force
tvedit info merged.safetensors
