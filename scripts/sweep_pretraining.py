"""Pretraining recipe sweep: held-out Shakespeare nats/char per configuration at (about) equal compute.

Each configuration trains a fresh model on the course's pretraining texts (Shakespeare's training part and
the documentation's pretraining share, :func:`minigpt.data.pretraining_texts`) with a compact vocabulary of
its own size built from those texts, then measures total nats / characters on held-out Shakespeare.

Step counts are set so that every run costs about the same number of floating-point operations as
``--budget-seconds`` of the reference configuration (4 layers x 128 wide, 4,096 tokens, context 128) at
``--reference-tokens-per-second`` (measured on 2 idle cores). Wall time is printed too, but it is only
meaningful on idle cores, one run at a time.

    python scripts/sweep_pretraining.py --out docs/pretraining_sweep.md
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigpt.data import make_loader, pretraining_texts, shakespeare_parts
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import build_compact_vocab
from minigpt.train import TrainConfig, nats_per_character, save_checkpoint, seed_everything, train


@dataclass(frozen=True)
class Run:
    vocab: int
    n_layer: int
    n_embd: int
    n_head: int
    context: int
    batch: int
    lr: float
    min_lr_ratio: float = 0.1


def forward_flops_per_token(run: Run, vocab_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: blocks, attention scores and mixing, output head."""
    blocks = 2 * 12 * run.n_layer * run.n_embd ** 2
    attention = 2 * 2 * run.n_layer * run.context * run.n_embd / 2  # causal: half the positions on average
    head = 2 * vocab_len * run.n_embd
    return blocks + attention + head


REFERENCE = Run(vocab=4096, n_layer=4, n_embd=128, n_head=4, context=128, batch=16, lr=3e-3)

GRID = [
    REFERENCE,
    Run(4096, 4, 128, 4, 128, 16, 6e-3),
    Run(8192, 4, 128, 4, 128, 16, 3e-3),
    Run(8192, 4, 128, 4, 64, 32, 3e-3),
    Run(8192, 4, 128, 4, 128, 16, 6e-3),
    Run(8192, 3, 160, 5, 128, 16, 4e-3),
    Run(30000, 4, 128, 4, 64, 32, 2e-3),
]


def run_one(run: Run, budget_flops: float, seed: int = 123, save: Path | None = None) -> dict:
    texts = pretraining_texts()
    vocab = build_compact_vocab(texts, run.vocab)
    train_ids = np.concatenate([np.asarray(vocab.encode(t), dtype=np.int64) for t in texts])
    val_ids = np.asarray(vocab.encode(shakespeare_parts()[1]), dtype=np.int64)
    tokens = budget_flops / (3 * forward_flops_per_token(run, len(vocab)))
    steps = int(tokens // (run.batch * run.context))
    cfg = GPTConfig(vocab_size=len(vocab), context_length=run.context, n_layer=run.n_layer, n_head=run.n_head,
                    n_embd=run.n_embd)
    seed_everything(seed)
    model = GPTModel(cfg)
    loader = make_loader(train_ids, run.context, run.batch, seed=seed)
    history = train(model, loader, None, TrainConfig(steps=steps, lr=run.lr, min_lr=run.lr * run.min_lr_ratio,
                                                      warmup_steps=min(50, steps // 10), seed=seed, device="cpu",
                                                      progress=False))
    result = nats_per_character(model, val_ids, vocab.decode)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        stem = f"v{run.vocab}-l{run.n_layer}-d{run.n_embd}-t{run.context}-b{run.batch}-lr{run.lr:g}"
        save_checkpoint(save / f"{stem}.safetensors", model)
        vocab.save(save / f"{stem}.vocab.json")
    return {**run.__dict__, "vocab_len": len(vocab), "params": sum(p.numel() for p in model.parameters()),
            "steps": steps, "tokens": history.tokens, "seconds": round(history.seconds, 1),
            "tokens_per_second": round(history.tokens / history.seconds),
            "epochs": round(history.tokens / len(train_ids), 2),
            "nats_per_char": round(result["nats_per_char"], 4), "nats_per_token": round(result["nats_per_token"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-seconds", type=float, default=170.0)
    parser.add_argument("--reference-tokens-per-second", type=float, default=12_500.0)
    parser.add_argument("--only", type=int, nargs="*", help="indices into GRID")
    parser.add_argument("--save", default=None, help="folder for each run's model and vocabulary")
    parser.add_argument("--jsonl", default="docs/pretraining_sweep.jsonl", help="results are appended here")
    args = parser.parse_args()
    ref_vocab = len(build_compact_vocab(pretraining_texts(), REFERENCE.vocab))
    budget = args.budget_seconds * args.reference_tokens_per_second * 3 * forward_flops_per_token(REFERENCE, ref_vocab)
    for i in args.only if args.only else range(len(GRID)):
        run = GRID[i]
        row = run_one(run, budget, save=Path(args.save) if args.save else None)
        print(json.dumps(row), flush=True)
        with Path(args.jsonl).open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("SWEEP_THREADS", "2")))
    start = time.perf_counter()
    main()
    print(f"sweep done in {time.perf_counter() - start:.0f} s")
