#!/usr/bin/env bash
# Data parallel on two GPUs against one: `multitoken bench train --gpus 2` (global batch 32)
# against `--gpus 1` (batch 16), `base` V 8192 T 512 in bf16, n = 1 and n = 4 r = 4, beside the
# PyTorch twin under torchrun (DistributedDataParallel, bf16 autocast, fused AdamW; eager, and
# torch.compile with --compile), alternating, ROUNDS rounds. Prints one JSON line per head:
# tokens/s, the two-GPU speed-up and scaling efficiency, the all-reduce time the backward pass
# does not hide, and the ratio to the twin. Needs two GPUs, NCCL and python3 with torch; no Rust
# toolchain: pass the release binary as MULTITOKEN_BIN (default target/release/multitoken).
# Usage: scripts/bench-multi-gpu.sh [ROUNDS] [--compile]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${MULTITOKEN_BIN:-$root/target/release/multitoken}"
rounds=2
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then rounds="$1"; shift; fi
torch_mode=()
[[ "${1:-}" == --compile ]] && torch_mode=(--compile)
export NCCL_NVLS_ENABLE=0 # NVLink multicast off, always
shape=(--model base --vocab-size 8192 --seq 512 --steps 8)
out="$(mktemp -d)"
for head in "1 1" "4 4"; do
  read -r n r <<<"$head"
  tag="n${n}_r${r}"
  for _ in $(seq "$rounds"); do
    "$bin" bench train "${shape[@]}" --batch 16 --horizon "$n" --rank "$r" --device cuda --precision bf16 --json >>"$out/$tag.one.jsonl"
    "$bin" bench train "${shape[@]}" --batch 32 --horizon "$n" --rank "$r" --device cuda --precision bf16 --gpus 2 --json >>"$out/$tag.two.jsonl"
    torchrun --standalone --nproc-per-node 2 "$root/reference/bench_train.py" "${shape[@]}" --batch 32 --horizon "$n" --rank "$r" \
      --device cuda --bf16 --fused-adamw "${torch_mode[@]}" 2>/dev/null | grep '^{' >>"$out/$tag.ddp.jsonl"
  done
  python3 - "$out/$tag" "$n" "$r" "${torch_mode[*]:-eager}" <<'PY'
import json, statistics, sys
prefix, n, r, mode = sys.argv[1:]
rows = {k: [json.loads(l) for l in open(f"{prefix}.{k}.jsonl")] for k in ("one", "two", "ddp")}
med = lambda k, key: statistics.median(x[key] for x in rows[k])
one, two, ddp = med("one", "tokens_per_s"), med("two", "tokens_per_s"), med("ddp", "tokens_per_s")
print(json.dumps({
    "model": "base", "V": 8192, "T": 512, "n": int(n), "r": int(r), "precision": "bf16", "torch_mode": mode.strip("-"),
    "rounds": len(rows["two"]), "gpu": rows["two"][0].get("gpu"),
    "one_gpu_B16_tokens_per_s": round(one), "two_gpus_B32_tokens_per_s": round(two),
    "speed_up": round(two / one, 3), "scaling_efficiency": round(two / one / 2, 3),
    "two_gpus_step_ms": round(med("two", "step_ms"), 2), "all_reduce_ms": round(med("two", "all_reduce_ms"), 2),
    "ddp_two_gpus_tokens_per_s": round(ddp), "ratio_to_ddp": round(two / ddp, 3),
}))
PY
done
