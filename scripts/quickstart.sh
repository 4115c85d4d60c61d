#!/usr/bin/env bash
# The main job, from a fresh clone: fetch Moby-Dick, train a BPE tokenizer and a `small`
# model on the CPU for a few minutes, then generate from it.
# Everything it writes goes under runs/quickstart/ (replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."

steps="${QUICKSTART_STEPS:-400}"
run=runs/quickstart
bin=target/release/multitoken

echo "== fetching the corpus" >&2
scripts/fetch-data.sh data/corpora moby-dick
echo "== building" >&2
cargo build --release --quiet

rm -rf "$run"
mkdir -p "$run"
echo "== training the tokenizer" >&2
"$bin" tokenizer train --input data/corpora/moby-dick.txt --vocab-size 4096 --out "$run/tokenizer.json"
"$bin" data prepare --tokenizer "$run/tokenizer.json" --input data/corpora/moby-dick.txt --out "$run/data"

echo "== training a small GPT-2 for $steps steps (B=8, T=256)" >&2
"$bin" train --data "$run/data" --out "$run/model" --model small --steps "$steps" --batch 8 --seq 256 --lr 1e-3 --eval-every 100

echo "== generating (greedy, then sampled at temperature 0.8)" >&2
"$bin" sample --checkpoint "$run/model" --prompt "Call me Ishmael." --max-new-tokens 60 --greedy
"$bin" sample --checkpoint "$run/model" --prompt "The whale" --max-new-tokens 60 --temperature 0.8 --top-k 50 --seed 1
echo "== done: checkpoint in $run/model (loss curves: $run/model/loss.svg)" >&2
