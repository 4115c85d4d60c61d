#!/usr/bin/env bash
# The main job, from a fresh clone: fetch Moby-Dick, train a BPE tokenizer and a `small` GPT-2
# with the rank-4 CP head predicting n = 4 tokens per position (a few minutes on a CPU), then
# generate with self-speculative decoding and measure it against autoregressive decoding.
# Everything it writes goes under runs/quickstart/ (replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."

steps="${QUICKSTART_STEPS:-300}"
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

echo "== training a small GPT-2 with the CP head (n=4, r=4) for $steps steps (B=8, T=128)" >&2
"$bin" train --data "$run/data" --out "$run/model" --model small --horizon 4 --rank 4 \
  --steps "$steps" --batch 8 --seq 128 --lr 2e-3 --eval-every 100

prompt="Call me Ishmael. Some years ago"
echo "== sampling (temperature 0.8), self-speculative" >&2
"$bin" sample --checkpoint "$run/model" --prompt "$prompt" --max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 1 --speculative
echo "== greedy: autoregressive against self-speculative decoding" >&2
"$bin" bench decode --checkpoint "$run/model" --prompt "$prompt" --max-new-tokens 200 --greedy
echo "== sampling (temperature 0.8, top-k 50): autoregressive against self-speculative decoding" >&2
"$bin" bench decode --checkpoint "$run/model" --prompt "$prompt" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1
echo "== done: checkpoint in $run/model (loss curves: $run/model/loss.svg)" >&2
