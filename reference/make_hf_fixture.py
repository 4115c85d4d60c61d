"""Writes tests/fixtures/hf-gpt2-tiny/ (or OUT_DIR): a GPT-2 of tiny width but GPT-2's own
vocabulary (50257) and positions (1024), as transformers' save_pretrained writes it (float16,
to keep the fixture small), and what transformers computes on it: the next-token loss of a
fixed sentence, in float32 from the float16 weights (expected.json).

    python reference/make_hf_fixture.py [OUT_DIR]

The directory holds no tokenizer: the test adds GPT-2's published BPE files
(scripts/fetch-gpt2-bpe.sh), as a user's copy of a published GPT-2 would have them.
"""
import json
import sys

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

# "The quick brown fox jumps over the lazy dog." in GPT-2's tokenizer
SENTENCE = "The quick brown fox jumps over the lazy dog."
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf-gpt2-tiny"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=8, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # wider than GPT-2's initialisation, so that the loss depends on every weight
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model = model.half()
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model.float()(torch.tensor([IDS])).logits[0]
        losses = F.cross_entropy(logits[:-1].double(), torch.tensor(IDS[1:]), reduction="none")
    expected = {
        "sentence": SENTENCE,
        "ids": IDS,
        "ntp_loss": losses.mean().item(),
        "position_losses": losses.tolist(),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    with open(f"{out}/expected.json", "w") as f:
        json.dump(expected, f, indent=1)
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
