#!/usr/bin/env bash
# The CPU benchmark table of docs/results.md: multitoken against the PyTorch twin, side by side,
# for next-token training and the CP head at n = 4 with r = 1, 4, 8 (small, V = 4096, B = 8, T = 256,
# 2 threads), then the head's share of a step from the op profile.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--model small --vocab-size 4096 --batch 8 --seq 256 --threads 2)
scripts/bench-vs-torch.sh 3 "${common[@]}" --horizon 1 --rank 1 --steps 10
for r in 1 4 8; do
  scripts/bench-vs-torch.sh 2 "${common[@]}" --horizon 4 --rank "$r" --steps 5
done
for r in 1 4 8; do
  echo "== op profile, n=4 r=$r" >&2
  MULTITOKEN_PROFILE=1 target/release/multitoken bench train "${common[@]}" --horizon 4 --rank "$r" --steps 3 >/dev/null
done
