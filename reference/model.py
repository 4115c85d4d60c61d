"""The PyTorch twin of multitoken's model (docs/math.md, "The model" and "The CP head").

GPT-2 exactly as transformers computes it, written out plainly (nanoGPT style), plus the
rank-r CP multi-token head. Used to write parity fixtures and as the benchmark baseline.
Parameter names match the checkpoint's (Hugging Face GPT-2 names, Conv1D layout).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {"tiny": (64, 2, 4, 128), "small": (256, 4, 4, 256), "base": (768, 12, 12, 1024)}


@dataclass
class Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    horizon: int = 1
    rank: int = 1

    @staticmethod
    def preset(name, vocab_size, horizon=1, rank=1):
        c, l, h, p = PRESETS[name]
        return Config(vocab_size, p, c, l, h, horizon, rank)

    @property
    def has_head(self):
        return self.horizon > 1 or self.rank > 1


class Conv1D(nn.Module):
    """out = x W + b with W stored (in, out), as in GPT-2."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)


class Head(nn.Module):
    """Rank-r CP head: expanders W (r, n, C, C), gate G (r, C), g (r)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.n_embd
        self.expand = nn.Module()
        self.expand.weight = nn.Parameter(torch.empty(cfg.rank, cfg.horizon, c, c))
        self.gate = nn.Linear(c, cfg.rank)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.mtp = Head(cfg) if cfg.has_head else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.cfg
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "ln_" in name:
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif name == "mtp.expand.weight":
                eye = torch.eye(cfg.n_embd).expand_as(p)
                noise = 0.0 if cfg.rank == 1 else 0.02 / math.sqrt(cfg.n_embd)
                p.copy_(eye + noise * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)

    def hidden(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in t.h:
            x = block(x)
        return t.ln_f(x)

    def losses(self, idx, targets, aux_coef=0.01):
        """idx (B, T), targets (B, T, n). Returns (objective, joint_loss, head_losses (n,), aux)."""
        h = self.hidden(idx)
        wte = self.transformer.wte.weight
        if self.mtp is None:
            logits = h @ wte.T
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets[..., 0].reshape(-1))
            return loss, loss, loss.view(1), torch.ones((), dtype=h.dtype)  # aux ≡ 1 for r = 1
        cfg = self.cfg
        # z[b,t,α,s,:] = W[α,s] h[b,t]  (out = W · h)
        z = torch.einsum("asij,btj->btasi", self.mtp.expand.weight, h)
        logp = torch.log_softmax(z @ wte.T, dim=-1)  # (B, T, r, n, V)
        y = targets[:, :, None, :, None].expand(-1, -1, cfg.rank, -1, 1)
        logp_y = logp.gather(-1, y).squeeze(-1)  # (B, T, r, n)
        if cfg.rank == 1:
            log_w = torch.zeros(*h.shape[:2], 1, dtype=h.dtype, device=h.device)
        else:
            log_w = torch.log_softmax(self.mtp.gate(h), dim=-1)  # (B, T, r)
        joint = -torch.logsumexp(log_w + logp_y.sum(-1), dim=-1).mean()
        heads = -torch.logsumexp(log_w[..., None] + logp_y, dim=-2).mean(dim=(0, 1))
        w = log_w.exp()
        f = F.one_hot(w.argmax(-1), cfg.rank).to(w.dtype).mean(dim=(0, 1))
        aux = cfg.rank * (f * w.mean(dim=(0, 1))).sum()
        if cfg.rank == 1:  # aux ≡ 1: a constant, left out of the objective
            return joint, joint, heads, aux
        return joint + aux_coef * aux, joint, heads, aux

    def next_token_logits(self, idx):
        h = self.hidden(idx)
        return h @ self.transformer.wte.weight.T
