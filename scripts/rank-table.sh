#!/usr/bin/env bash
# The rank table of docs/results.md, rerun with one command: prose (Moby-Dick) and code (the
# Python standard library), the same token budget for every run. Defaults finish in about
# 20 minutes on 2 cores; more steps give better models and higher acceptance.
# Usage: scripts/rank-table.sh [STEPS=600] [MODEL=tiny] [VOCAB=1024]
# At GPU scale: RANK_TABLE_DEVICE=cuda RANK_TABLE_PRECISION=bf16 RANK_TABLE_SEEDS=2
# RANK_TABLE_PROMPTS=20 RANK_TABLE_SEQ=512 RANK_TABLE_BATCH=32 scripts/rank-table.sh STEPS small 8192
# (examples/rank_table.rs); a stopped study continues where it stopped when run again with the
# same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-600}"; model="${2:-tiny}"; vocab="${3:-1024}"
seq="${RANK_TABLE_SEQ:-128}"; batch="${RANK_TABLE_BATCH:-16}"
run=runs/rank-table
scripts/fetch-data.sh data/corpora moby-dick python-stdlib
cargo build --release --quiet --example rank_table
bin=target/release/multitoken
mkdir -p "$run"
for corpus in moby-dick python-stdlib; do
  if [ ! -f "$run/$corpus/train.bin" ]; then
    rm -f "$run/$corpus-tokenizer.json" # from a run stopped before its data was prepared
    "$bin" tokenizer train --input "data/corpora/$corpus.txt" --vocab-size "$vocab" --out "$run/$corpus-tokenizer.json"
    "$bin" data prepare --tokenizer "$run/$corpus-tokenizer.json" --input "data/corpora/$corpus.txt" --out "$run/$corpus"
  fi
done
target/release/examples/rank_table "$run" "$steps" "$model" "$seq" "$batch" "prose=$run/moby-dick" "code=$run/python-stdlib"
