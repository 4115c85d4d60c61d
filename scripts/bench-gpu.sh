#!/usr/bin/env bash
# The GPU training benchmark: `multitoken bench train --device cuda` and the
# PyTorch twin (reference/bench_train.py) on the same card, alternating, for next-token
# (n = 1, r = 1) and the CP head (n = 4, r = 4), in f32, TF32 and bf16, PyTorch eager and compiled.
# Prints one JSON line per comparison; memory both ways: what each caching allocator held at most
# (ours: the pool; PyTorch: max_memory_reserved), and what was in use at most (PyTorch:
# max_memory_allocated). Needs python3 with torch and CUDA; no Rust toolchain:
# pass the release binary built elsewhere as MULTITOKEN_BIN (default target/release/multitoken).
# Usage: scripts/bench-gpu.sh [ROUNDS] [--f32] [--tf32] [--bf16] [--compile] [--tf32-compile] [--bf16-compile]
#   (the flags choose the variants: f32, TF32 or bf16 matrix products, PyTorch eager or
#   torch.compile; default --f32, eager). In bf16 ours is `--precision bf16` and the twin runs
#   under bf16 autocast with fused AdamW, as its users run it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${MULTITOKEN_BIN:-$root/target/release/multitoken}"
rounds=2
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then rounds="$1"; shift; fi
variants=()
for flag in "$@"; do
  case "$flag" in
    --f32) variants+=("f32 eager") ;;
    --tf32) variants+=("tf32 eager") ;;
    --compile) variants+=("f32 compile") ;;
    --tf32-compile) variants+=("tf32 compile") ;;
    --bf16) variants+=("bf16 eager") ;;
    --bf16-compile) variants+=("bf16 compile") ;;
    *) echo "unknown flag $flag" >&2; exit 2 ;;
  esac
done
[ ${#variants[@]} -eq 0 ] && variants=("f32 eager")
shape=(--model base --vocab-size 8192 --batch 16 --seq 512 --steps 8)
out="$(mktemp -d)"
for variant in "${variants[@]}"; do
  read -r precision mode <<<"$variant"
  for head in "1 1" "4 4"; do
    read -r n r <<<"$head"
    torch_flags=(--device cuda)
    [[ "$precision" == tf32 ]] && torch_flags+=(--tf32)
    [[ "$precision" == bf16 ]] && torch_flags+=(--bf16 --fused-adamw)
    [[ "$mode" == compile ]] && torch_flags+=(--compile)
    tag="${precision}_${mode}_n${n}_r${r}"
    for _ in $(seq "$rounds"); do
      "$bin" bench train "${shape[@]}" --horizon "$n" --rank "$r" --device cuda --precision "$precision" --json >>"$out/$tag.rust.jsonl"
      python3 "$root/reference/bench_train.py" "${shape[@]}" --horizon "$n" --rank "$r" "${torch_flags[@]}" >>"$out/$tag.torch.jsonl"
    done
    python3 - "$out/$tag" "$precision" "$mode" "$n" "$r" <<'PY'
import json, statistics, sys
prefix, precision, mode, n, r = sys.argv[1:]
rust = [json.loads(l) for l in open(prefix + ".rust.jsonl")]
torch = [json.loads(l) for l in open(prefix + ".torch.jsonl")]
med = lambda rows, k: statistics.median(x[k] for x in rows)
print(json.dumps({
    "model": "base", "V": 8192, "B": 16, "T": 512, "n": int(n), "r": int(r), "precision": precision, "torch_mode": mode,
    "gpu": rust[0].get("gpu"), "rounds": len(rust),
    "multitoken_step_ms": round(med(rust, "step_ms"), 2),
    "multitoken_tokens_per_s": round(med(rust, "tokens_per_s")), "multitoken_model_tflop_per_s": round(med(rust, "model_tflop_per_s"), 1), "torch_tokens_per_s": round(med(torch, "tokens_per_s")), "torch_step_ms": round(med(torch, "step_ms"), 2),
    "speed_ratio": round(med(torch, "step_ms") / med(rust, "step_ms"), 3),
    "multitoken_peak_gpu_mib": round(med(rust, "peak_gpu_bytes") / 2**20), "torch_peak_reserved_mib": round(med(torch, "peak_gpu_reserved_bytes") / 2**20),
    "memory_ratio": round(med(rust, "peak_gpu_bytes") / med(torch, "peak_gpu_reserved_bytes"), 3),
    "multitoken_peak_in_use_mib": round(med(rust, "peak_gpu_in_use_bytes") / 2**20), "torch_peak_allocated_mib": round(med(torch, "peak_gpu_bytes") / 2**20),
    "in_use_ratio": round(med(rust, "peak_gpu_in_use_bytes") / med(torch, "peak_gpu_bytes"), 3),
    "torch": torch[0]["torch"],
}))
PY
  done
done
