#!/usr/bin/env bash
# The rank study of docs/results.md, rerun with one command: prose (Shakespeare, Milton, then
# Moby-Dick, whose end is held out) and code (the Python standard library), the same token
# budget for every run. Defaults (a `tiny` table) finish in about 20 minutes on 2 cores; the
# table and plot go to the study's directory under runs/rank-table/ (and, with
# RANK_TABLE_DOCS=1, into docs/).
# Usage: scripts/rank-table.sh [STEPS=600] [MODEL=tiny] [VOCAB=1024]
# At GPU scale: RANK_TABLE_DEVICE=cuda RANK_TABLE_PRECISION=bf16 RANK_TABLE_SEEDS=2
# RANK_TABLE_PROMPTS=20 RANK_TABLE_SEQ=256 RANK_TABLE_BATCH=64 RANK_TABLE_DOCS=1 scripts/rank-table.sh 3072 small 8192
# (examples/rank_table.rs); a stopped study continues where it stopped when run again with the
# same arguments, and RANK_TABLE_DEADLINE_S=S starts no cell that would end after S seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-600}"; model="${2:-tiny}"; vocab="${3:-1024}"
seq="${RANK_TABLE_SEQ:-128}"; batch="${RANK_TABLE_BATCH:-16}"
# one directory per study: a study with other arguments, device or precision starts its own
# (the finished cells it skips are only those of the same study)
device="${RANK_TABLE_DEVICE:-cpu}"; precision="${RANK_TABLE_PRECISION:-f32}"; prompts="${RANK_TABLE_PROMPTS:-1}"
data=runs/rank-table/data-v$vocab
run=runs/rank-table/$model-v$vocab-steps$steps-T$seq-B$batch-$device-$precision-p$prompts
scripts/fetch-data.sh data/corpora shakespeare milton moby-dick python-stdlib
cargo build --release --quiet --bin multitoken --example rank_table
bin=target/release/multitoken
mkdir -p "$data" "$run"
# the committed prompts (examples/prompts) come from the last 8 % of moby-dick.txt and of
# python-stdlib.txt, inside the last 10 % of tokens that validation holds out
declare -A texts=([prose]="shakespeare milton moby-dick" [code]="python-stdlib")
for corpus in prose code; do
  if [ ! -f "$data/$corpus/train.bin" ]; then
    inputs=()
    for text in ${texts[$corpus]}; do inputs+=("data/corpora/$text.txt"); done
    rm -f "$data/$corpus-tokenizer.json" # from a run stopped before its data was prepared
    "$bin" tokenizer train --input "${inputs[@]}" --vocab-size "$vocab" --out "$data/$corpus-tokenizer.json"
    "$bin" data prepare --tokenizer "$data/$corpus-tokenizer.json" --input "${inputs[@]}" --val-fraction 0.1 --out "$data/$corpus"
  fi
done
target/release/examples/rank_table "$run" "$steps" "$model" "$seq" "$batch" "prose=$data/prose" "code=$data/code"
