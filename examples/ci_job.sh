#!/usr/bin/env bash
# CI job: build a merged model from task vectors listed in a recipe and fail loudly on any error.
#   examples/ci_job.sh RECIPE.yaml OUT.safetensors      (e.g. examples/recipe.yaml, after examples/make_inputs.sh)
# Every tvedit error exits non-zero with a one-line message (exit codes: `tvedit --help`), and
# `set -euo pipefail` makes the job fail on the first one. Nothing half-written is ever left at OUT,
# and OUT.json (the output's JSON record) is written only once OUT is complete.
# --force lets a re-run replace OUT; it does not switch off any check: vectors from different bases,
# regimes or model families still fail the job (exit 4) unless the recipe's author adds
# --allow-mismatch, which the output's manifest then records.
set -euo pipefail
recipe=${1:?recipe.yaml}
out=${2:?output.safetensors}
record=$(tvedit add "$recipe" -o "$out" --force --json)
tvedit info "$out" --verify --json > /dev/null   # the file's content matches its manifest hash
printf '%s\n' "$record" > "$out.json"
echo "built $out (sha256 $(python -c 'import json,sys; print(json.loads(sys.argv[1])["sha256"])' "$record"))"
# Accuracy gating (evaluate --min-accuracy) is added to this job by the evaluate command.
