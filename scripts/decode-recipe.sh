#!/usr/bin/env bash
# The speed-up recipe of docs/results.md, rerun with one command on a GPU machine: `base` with the
# n = 4, r = 4 head trained on the Python standard library for 3000 steps of B = 16, T = 512 in
# TF32, one run per seed, measured after 1000, 2000 and 3000 steps (greedy and sampled decoding
# after each of the 24 held-out code prompts); rows to runs/decode-recipe/recipe.jsonl, then the
# medians per stage (examples/decode_recipe.rs). About 4 minutes per seed on one H200.
# Usage: scripts/decode-recipe.sh [SEEDS=1,2,3] [STAGES=1000,2000,3000]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-1,2,3}"; stages="${2:-1000,2000,3000}"
data=runs/rank-table/data-v8192/code
scripts/fetch-data.sh data/corpora python-stdlib
cargo build --release --quiet --bin multitoken --example decode_recipe
bin=target/release/multitoken
if [ ! -f "$data/train.bin" ]; then
  mkdir -p "$data"
  # the same data as the rank study's code corpus at V = 8192 (scripts/rank-table.sh), whose
  # validation holds out the end the committed prompts come from
  rm -f "$data-tokenizer.json"
  "$bin" tokenizer train --input data/corpora/python-stdlib.txt --vocab-size 8192 --out "$data-tokenizer.json"
  "$bin" data prepare --tokenizer "$data-tokenizer.json" --input data/corpora/python-stdlib.txt --val-fraction 0.1 --out "$data"
fi
target/release/examples/decode_recipe runs/decode-recipe "$data" "$seeds" "$stages"
