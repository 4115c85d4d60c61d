"""Writes the PyTorch parity fixtures that tests/parity.rs compares against.

    python reference/make_fixtures.py            # writes tests/fixtures/*.safetensors

Everything is float64 so that differences measure disagreement, not rounding. Each fixture holds
the weights (param.NAME), a batch (inputs (B, T), targets (B, T, n)), the outputs, every
gradient (grad.NAME) and the objective after each of 5 AdamW steps.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, Model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
AUX_COEF = 0.01


def batch(cfg, b, t, gen):
    rows = torch.randint(0, cfg.vocab_size, (b, t + cfg.horizon), generator=gen)
    inputs = rows[:, :t]
    targets = torch.stack([rows[:, 1 + s : 1 + s + t] for s in range(cfg.horizon)], dim=-1)
    return inputs, targets


def fixture(name, cfg, b=2, t=8, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = Model(cfg).double()
    if cfg.has_head:
        with torch.no_grad():  # move the gate off its zero bias so every path is exercised
            model.mtp.gate.bias.normal_(0.0, 0.5)
    tensors = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
    inputs, targets = batch(cfg, b, t, gen)
    tensors["inputs"], tensors["targets"] = inputs, targets

    objective, joint, heads, aux = model.losses(inputs, targets, AUX_COEF)
    objective.backward()
    tensors["objective"] = objective.detach().reshape(1)
    tensors["joint_loss"] = joint.detach().reshape(1)
    tensors["head_losses"] = heads.detach().reshape(-1)
    tensors["aux"] = aux.detach().reshape(1)
    tensors["hidden"] = model.hidden(inputs).detach()
    tensors["logits"] = model.next_token_logits(inputs).detach()
    for k, p in model.named_parameters():
        tensors[f"grad.{k}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], **ADAMW)
    step_inputs, step_targets, step_objectives = [], [], []
    for _ in range(5):
        x, y = batch(cfg, b, t, gen)
        objective, *_ = model.losses(x, y, AUX_COEF)
        opt.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_inputs.append(x)
        step_targets.append(y)
        step_objectives.append(objective.detach())
    tensors["adamw.inputs"] = torch.stack(step_inputs)
    tensors["adamw.targets"] = torch.stack(step_targets)
    tensors["adamw.objectives"] = torch.stack(step_objectives)
    for k, p in model.named_parameters():
        tensors[f"adamw.param.{k}"] = p.detach().clone()

    meta = {k: str(v) for k, v in vars(cfg).items()}
    meta.update({"batch": str(b), "seq": str(t), "aux_coef": str(AUX_COEF), "lr": str(ADAMW["lr"]), "torch": torch.__version__})
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path, metadata=meta)
    print(f"{path}: {os.path.getsize(path)} bytes, objective {objective.item():.6f}")


if __name__ == "__main__":
    fixture("gpt2", Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    if "--backbone-only" not in sys.argv:
        fixture("cp_head_n3_r4", Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, horizon=3, rank=4))
        fixture("cp_head_n3_r1", Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, horizon=3, rank=1))
