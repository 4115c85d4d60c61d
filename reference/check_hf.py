"""Independent reading of a multitoken checkpoint: the backbone through Hugging Face
transformers (GPT2LMHeadModel.from_pretrained), the head (docs/math.md, "The CP head") in plain
PyTorch. Scores a text exactly as `multitoken eval` defines it and prints both results.

    python reference/check_hf.py CKPT TEXT_FILE [--eval-json FILE]

With --eval-json (the output of `multitoken eval --json`), exits non-zero unless the losses agree
to 1e-4 relative.
"""
import argparse
import json
import sys

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("text_file")
    ap.add_argument("--eval-json")
    args = ap.parse_args()

    model = GPT2LMHeadModel.from_pretrained(args.checkpoint).eval()
    cfg = model.config
    n, r = getattr(cfg, "mtp_horizon", 1), getattr(cfg, "mtp_rank", 1)
    tok = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
    ids = tok.encode(open(args.text_file, encoding="utf-8", errors="replace").read(), add_special_tokens=False).ids
    N, P = len(ids), cfg.n_positions
    head = None
    if n > 1 or r > 1:
        weights = load_file(f"{args.checkpoint}/model.safetensors")
        head = (weights["mtp.expand.weight"], weights["mtp.gate.weight"], weights["mtp.gate.bias"])
    wte = model.transformer.wte.weight

    last = N - 1 - n  # largest scored position
    joint_sum, head_sums, count = 0.0, torch.zeros(n, dtype=torch.float64), 0
    with torch.no_grad():
        for start in range(0, last + 1, P):
            end = min(start + P, N)
            scored = min(last + 1 - start, end - start)
            x = torch.tensor(ids[start:end])[None]
            out = model(x, output_hidden_states=True)
            h = out.hidden_states[-1][0, :scored].double()  # after ln_f
            y = torch.tensor([ids[t + 1 : t + 1 + n] for t in range(start, start + scored)])  # (S, n)
            if head is None:
                logits = out.logits[0, :scored].double()
                lp = torch.log_softmax(logits, -1).gather(-1, y[:, :1]).squeeze(-1)
                joint_sum += -lp.sum().item()
                head_sums[0] += -lp.sum().item()
            else:
                W, G, g = (t.double() for t in head)
                z = torch.einsum("asij,tj->tasi", W, h)  # (S, r, n, C)
                logp = torch.log_softmax(z @ wte.double().T, -1)
                lpy = logp.gather(-1, y[:, None, :, None].expand(-1, r, -1, 1)).squeeze(-1)  # (S, r, n)
                log_w = torch.log_softmax(h @ G.T + g, -1) if r > 1 else torch.zeros(scored, 1, dtype=torch.float64)
                joint_sum += -torch.logsumexp(log_w + lpy.sum(-1), -1).sum().item()
                head_sums += -torch.logsumexp(log_w[..., None] + lpy, 1).sum(0)
            count += scored
    result = {"joint_loss": joint_sum / count, "ntp_loss": head_sums[0].item() / count, "head_losses": (head_sums / count).tolist(), "tokens": count}
    print(json.dumps({"transformers": result}))
    if args.eval_json:
        ours = json.load(open(args.eval_json))
        print(json.dumps({"multitoken": ours}))
        worst = max(abs(ours[k] - result[k]) / abs(result[k]) for k in ("joint_loss", "ntp_loss"))
        same_count = ours["tokens"] == result["tokens"]
        print(f"max relative difference {worst:.2e}, positions {ours['tokens']} vs {result['tokens']}")
        if worst > 1e-4 or not same_count:
            sys.exit(1)


if __name__ == "__main__":
    main()
