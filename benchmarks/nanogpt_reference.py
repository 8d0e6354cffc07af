"""nanoGPT's CPU shakespeare-char recipe, written out in PyTorch: the reference figure for
`shakespeare_char.py`, measured instead of quoted.

nanoGPT's README reports validation loss 1.88 for its CPU run (4 layers, 4 heads, width 128,
context 64, batch 12, 2,000 iterations, lr 1e-3, dropout 0). That is one run, evaluated on
20 random batches. This script trains the same model with the same recipe from several seeds,
so `shakespeare_char.py`'s result can be compared with a distribution rather than one draw:

- model: token + learned position embeddings (N(0, 0.02)), pre-LN blocks without biases
  (`bias=False`, nanoGPT's default), exact GELU, causal scaled dot-product attention, final
  LayerNorm, output projection tied to the token embedding; Linear kernels N(0, 0.02), the
  two residual projections N(0, 0.02 / sqrt(2 x layers));
- AdamW, betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on every 2-D parameter; 100 warmup
  iterations, cosine decay to 1e-4 at iteration 2,000; gradient clipping at norm 1.0;
- batches of 12 random 64-character windows of the first 90% of the text; at the end, the
  mean loss of 20 random validation batches (nanoGPT's `estimate_loss`) and the loss over
  all contiguous validation windows.

This is an independent transcription of the recipe, not nanoGPT's code. It needs PyTorch,
which keras-llm does not depend on (run it where torch is installed):

    python benchmarks/nanogpt_reference.py --data input.txt --seeds 1337,1338,1339
"""
import argparse
import json
import math
import multiprocessing
import os
import time

import numpy as np


def train_one(args, seed):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    vocab, width, layers, heads, context = len(chars), 128, 4, 4, 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            bias = args.bias
            self.ln_1 = nn.LayerNorm(width, bias=bias)
            self.qkv = nn.Linear(width, 3 * width, bias=bias)
            self.attn_proj = nn.Linear(width, width, bias=bias)
            self.ln_2 = nn.LayerNorm(width, bias=bias)
            self.fc = nn.Linear(width, 4 * width, bias=bias)
            self.mlp_proj = nn.Linear(4 * width, width, bias=bias)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
            q, k, v = (z.view(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, width))
            return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(context, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(width, bias=args.bias)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, 0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            for block in self.blocks:
                for proj in (block.attn_proj, block.mlp_proj):
                    nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * layers))

        def forward(self, x, y):
            h = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
            for block in self.blocks:
                h = block(h)
            logits = self.ln_f(h) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, args.beta2), eps=1e-8)

    def lr_at(it):
        if it < args.warmup:
            return 1e-3 * (it + 1) / (args.warmup + 1)
        ratio = (it - args.warmup) / (args.steps - args.warmup)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (
            1e-3 - args.min_lr)

    def batch(data):
        starts = rng.integers(0, len(data) - context, 12)
        x = np.stack([data[s:s + context] for s in starts])
        y = np.stack([data[s + 1:s + 1 + context] for s in starts])
        return torch.from_numpy(x), torch.from_numpy(y)

    @torch.no_grad()
    def estimate(data):
        model.eval()
        losses = [float(model(*batch(data))) for _ in range(20)]
        model.train()
        return float(np.mean(losses))

    started = time.perf_counter()
    for it in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        loss = model(*batch(train))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    val_loss, train_loss = estimate(val), estimate(train)
    with torch.no_grad():
        model.eval()
        windows = (len(val) - 1) // context
        x = torch.from_numpy(val[:windows * context].reshape(windows, context))
        y = torch.from_numpy(val[1:windows * context + 1].reshape(windows, context))
        full = sum(float(model(x[i:i + 128], y[i:i + 128])) * len(x[i:i + 128])
                   for i in range(0, windows, 128)) / windows
    return {"seed": seed, "val_loss": val_loss, "train_loss": train_loss,
            "full_val_loss": full, "train_seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--seeds", default="1337,1338,1339,1340,1341")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    # nanoGPT's values by default; the flags try variants of the free settings.
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with multiprocessing.get_context("spawn").Pool(len(seeds)) as pool:
        runs = pool.starmap(train_one, [(args, seed) for seed in seeds])
    import torch

    summary = {
        "benchmark": "nanogpt_reference", "torch": torch.__version__, "steps": args.steps,
        "recipe": {"min_lr": args.min_lr, "warmup": args.warmup,
                   "weight_decay": args.weight_decay, "beta2": args.beta2, "bias": args.bias},
        "threads_per_run": args.threads, "runs": runs,
        "val_loss": float(np.mean([r["val_loss"] for r in runs])),
        "val_loss_std": float(np.std([r["val_loss"] for r in runs], ddof=1)) if len(runs) > 1
        else 0.0,
        "full_val_loss": float(np.mean([r["full_val_loss"] for r in runs])),
        "full_val_loss_std": float(np.std([r["full_val_loss"] for r in runs], ddof=1))
        if len(runs) > 1 else 0.0,
    }
    for run in runs:
        print(f"seed {run['seed']}: val loss {run['val_loss']:.4f} (20 batches), "
              f"{run['full_val_loss']:.4f} (all windows), train {run['train_loss']:.4f}, "
              f"{run['train_seconds']} s")
    print(f"mean val loss {summary['val_loss']:.4f} +- {summary['val_loss_std']:.4f}; "
          f"all windows {summary['full_val_loss']:.4f} +- {summary['full_val_loss_std']:.4f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
