"""Times full training steps of the PyTorch twin, as `multitoken bench train` does for the Rust
model: random tokens, forward + backward + clip_grad_norm_(1.0) + AdamW, median step time
after 3 warm-up steps. Prints one JSON object. On a GPU, `--bf16` runs forward and loss under
bf16 autocast (weights, gradients and AdamW state stay f32), `--fused-adamw` uses PyTorch's fused
AdamW kernel and `--compile` torch.compile: the twin as its users run it.

python reference/bench_train.py --model small --vocab-size 4096 --horizon 1 --rank 1 --batch 8 --seq 256 --threads 2
python reference/bench_train.py --model base --vocab-size 8192 --horizon 4 --rank 4 --batch 16 --seq 512 --device cuda --bf16 --fused-adamw --compile

Under torchrun it is the DistributedDataParallel twin of `bench train --gpus N`, --batch the
global batch (each rank takes batch / N rows; NCCL on GPUs, gloo on the CPU):
torchrun --standalone --nproc-per-node 2 reference/bench_train.py --model base --vocab-size 8192 --batch 32 --seq 512 --device cuda --bf16 --fused-adamw
"""
import contextlib
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from model import Config, Model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--horizon", type=int, default=1)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast over forward and loss (CUDA)")
    ap.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) (CUDA)")
    args = ap.parse_args()
    if (args.bf16 or args.fused_adamw) and args.device != "cuda":
        sys.exit("--bf16 and --fused-adamw need --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # under torchrun (WORLD_SIZE > 1): DistributedDataParallel, --batch the global batch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist

        if args.batch % world:
            sys.exit(f"DDP needs a --batch that {world} ranks share evenly")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, local = dist.get_rank(), int(os.environ["LOCAL_RANK"])
        if args.device == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    torch.manual_seed(0)
    cfg = Config.preset(args.model, args.vocab_size, args.horizon, args.rank)
    model = Model(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=args.fused_adamw or None)
    objective_of = Objective(model)
    if world > 1:
        objective_of = torch.nn.parallel.DistributedDataParallel(objective_of, device_ids=[device.index] if device.type == "cuda" else None)
    objective_of = torch.compile(objective_of) if args.compile else objective_of
    n = cfg.horizon

    def step():
        rows = torch.randint(0, cfg.vocab_size, (args.batch // world, args.seq + n), device=device)
        idx = rows[:, : args.seq]
        targets = torch.stack([rows[:, 1 + s : 1 + s + args.seq] for s in range(n)], dim=-1)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with autocast:
            objective = objective_of(idx, targets)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(3 + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times)
    out = {
        "tokens_per_s": args.batch * args.seq / (step_ms / 1e3),
        "step_ms": step_ms,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16": args.bf16,
        "fused_adamw": args.fused_adamw,
        "compile": args.compile,
        "gpus": world,
        "step_ms_all": times,
    }
    if device.type == "cuda":
        # allocated: in tensors at once; reserved: what the caching allocator held, which is
        # what `multitoken bench train` reports as peak_gpu_bytes (its pool's peak)
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if rank == 0:
        print(json.dumps(out))
    if world > 1:
        torch.distributed.destroy_process_group()


class Objective(torch.nn.Module):
    """The training objective as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.losses(idx, targets)[0]


if __name__ == "__main__":
    main()
