#!/usr/bin/env bash
# CI job: build a merged model from task vectors listed in a recipe and fail loudly on any error.
#   examples/ci_job.sh RECIPE.yaml OUT.safetensors
# Every tvedit error exits non-zero with a one-line message (exit codes: `tvedit --help`), and
# `set -euo pipefail` makes the job fail on the first one. Nothing half-written is ever left at OUT.
set -euo pipefail
recipe=${1:?recipe.yaml}
out=${2:?output.safetensors}
tvedit add "$recipe" -o "$out" --force --json > "$out.json"
tvedit info "$out" --verify --json > /dev/null   # the file's content matches its manifest hash
echo "built $out (sha256 $(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$out.json"))"
# Accuracy gating (evaluate --min-accuracy) is added to this job by the evaluate command.
