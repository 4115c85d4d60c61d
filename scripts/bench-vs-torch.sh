#!/usr/bin/env bash
# Times `multitoken bench train` and the PyTorch twin (reference/bench_train.py) side by side,
# alternating ROUNDS times on the same machine, and prints the median of each and their ratio.
# Needs python3 with torch. Extra arguments go to both programs.
# Usage: scripts/bench-vs-torch.sh [ROUNDS] --model small --vocab-size 4096 --horizon 1 --rank 1 --batch 8 --seq 256 --threads 2
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rounds=3
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then rounds="$1"; shift; fi
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
bin="$root/target/release/multitoken"
out="$(mktemp -d)"
for i in $(seq "$rounds"); do
  "$bin" bench train "$@" --json >> "$out/rust.jsonl"
  python3 "$root/reference/bench_train.py" "$@" >> "$out/torch.jsonl"
done
python3 - "$out" "$*" <<'PY'
import json, statistics, sys, platform
out, args = sys.argv[1], sys.argv[2]
rust = [json.loads(l) for l in open(f"{out}/rust.jsonl")]
torch = [json.loads(l) for l in open(f"{out}/torch.jsonl")]
med = lambda rows, k: statistics.median(r[k] for r in rows)
r_tps, t_tps = med(rust, "tokens_per_s"), med(torch, "tokens_per_s")
r_mem, t_mem = med(rust, "peak_rss_bytes"), med(torch, "peak_rss_bytes")
print(json.dumps({
    "args": args, "rounds": len(rust), "machine": platform.processor() or platform.machine(),
    "multitoken_tokens_per_s": round(r_tps, 1), "torch_tokens_per_s": round(t_tps, 1),
    "speed_ratio": round(r_tps / t_tps, 3),
    "multitoken_peak_rss_mib": round(r_mem / 2**20, 1), "torch_peak_rss_mib": round(t_mem / 2**20, 1),
    "memory_ratio": round(r_mem / t_mem, 3),
    "torch": torch[0]["torch"],
}, indent=1))
PY
