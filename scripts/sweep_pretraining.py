"""Pretraining recipe sweep: held-out Shakespeare nats/char per configuration at equal training
time.

Each configuration trains a fresh model on the course's pretraining texts (Shakespeare's training
part and the documentation's pretraining share, :func:`minigpt.data.pretraining_texts`) with a
compact vocabulary of its own size built from those texts, then measures total nats / characters on
held-out Shakespeare.

The budget is wall-clock training time on this machine (``--budget-seconds``): each run first times
a few steps of its configuration and sets its step count from that throughput, so a cheaper model
trains on more tokens. That is the question the course asks (quality per CPU-minute), and it makes
the results meaningful only on idle cores, one run at a time.

    python scripts/sweep_pretraining.py --only 0 1     # rows of GRID; results append to
    docs/pretraining_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigpt import keep_freed_memory
from minigpt.data import make_loader, pretraining_texts, shakespeare_parts
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import build_compact_vocab
from minigpt.train import (
    TrainConfig,
    autocast,
    loss_fn,
    make_optimizer,
    nats_per_character,
    resolve_precision,
    save_checkpoint,
    seed_everything,
    train,
)


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
    weight_decay: float = 0.1
    # TrainConfig.optimizer: "muon" for the blocks' matrices (minigpt.muon)
    optimizer: str = "adamw"


def forward_flops_per_token(run: Run, vocab_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: blocks, attention scores and mixing, output
    head."""
    blocks = 2 * 12 * run.n_layer * run.n_embd**2
    # causal: half the positions on average
    attention = 2 * 2 * run.n_layer * run.context * run.n_embd / 2
    head = 2 * vocab_len * run.n_embd
    return blocks + attention + head


REFERENCE = Run(vocab=4096, n_layer=4, n_embd=128, n_head=4, context=128, batch=16, lr=3e-3)

GRID = [
    REFERENCE,
    Run(4096, 4, 128, 4, 128, 16, 6e-3, 0.05),
    Run(4096, 3, 128, 4, 128, 16, 6e-3, 0.05),
    Run(4096, 4, 128, 4, 64, 32, 6e-3, 0.05),
    Run(8192, 4, 128, 4, 128, 16, 6e-3, 0.05),
    Run(4096, 4, 128, 4, 128, 8, 4e-3, 0.05),
    Run(8192, 4, 128, 4, 64, 32, 3e-3),
    Run(30000, 4, 128, 4, 64, 32, 2e-3),
    Run(30000, 4, 128, 4, 64, 16, 2e-3),
    Run(4096, 4, 128, 4, 64, 32, 1e-2, 0.05),
    Run(4096, 4, 96, 4, 64, 32, 8e-3, 0.05),
    Run(4096, 4, 128, 4, 32, 64, 6e-3, 0.05),
    # after bf16 autocast on CPUs with native bf16 and glibc's freed memory kept (~1.8x the tokens
    # per second)
    Run(4096, 4, 128, 4, 32, 64, 6e-3, 0.1),
    Run(4096, 4, 192, 6, 32, 64, 4e-3, 0.1),
    Run(4096, 6, 128, 4, 32, 64, 6e-3, 0.1),
    Run(4096, 4, 128, 4, 64, 32, 6e-3, 0.1),
    Run(4096, 4, 128, 4, 32, 64, 8e-3, 0.0),
    # Muon for the blocks' matrices (minigpt.muon), AdamW for the rest, one lr for both
    Run(4096, 4, 128, 4, 32, 64, 6e-3, 0.1, optimizer="muon"),
    Run(4096, 4, 128, 4, 32, 64, 1e-2, 0.1, optimizer="muon"),
]


def measured_tokens_per_second(cfg: GPTConfig, run: Run, steps: int = 8) -> float:
    """Training throughput of this configuration on this machine, from a few steps of a throwaway
    model (in the precision and with the malloc setting that train() uses)."""
    keep_freed_memory()
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    model = GPTModel(cfg)
    optimizer = make_optimizer(
        model, TrainConfig(steps=steps, warmup_steps=1, optimizer=run.optimizer)
    )
    x = torch.randint(0, cfg.vocab_size, (run.batch, run.context))
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(cpu, precision):
            loss = loss_fn(model, x, x)
        loss.backward()
        optimizer.step()
    return steps * x.numel() / (time.perf_counter() - start)


def run_one(run: Run, budget_seconds: float, seed: int = 123, save: Path | None = None) -> dict:
    texts = pretraining_texts()
    vocab = build_compact_vocab(texts, run.vocab)
    train_ids = np.concatenate([np.asarray(vocab.encode(t), dtype=np.int64) for t in texts])
    val_ids = np.asarray(vocab.encode(shakespeare_parts()[1]), dtype=np.int64)
    cfg = GPTConfig(
        vocab_size=len(vocab),
        context_length=run.context,
        n_layer=run.n_layer,
        n_head=run.n_head,
        n_embd=run.n_embd,
    )
    steps = int(budget_seconds * measured_tokens_per_second(cfg, run) // (run.batch * run.context))
    seed_everything(seed)
    model = GPTModel(cfg)
    loader = make_loader(train_ids, run.context, run.batch, seed=seed)
    history = train(
        model,
        loader,
        None,
        TrainConfig(
            steps=steps,
            lr=run.lr,
            min_lr=run.lr * run.min_lr_ratio,
            weight_decay=run.weight_decay,
            warmup_steps=min(50, steps // 10),
            seed=seed,
            device="cpu",
            progress=False,
            optimizer=run.optimizer,
        ),
    )
    result = nats_per_character(model, val_ids, vocab.decode)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        stem = (
            f"v{run.vocab}-l{run.n_layer}-d{run.n_embd}-t{run.context}-b{run.batch}"
            f"-lr{run.lr:g}-{run.optimizer}"
        )
        save_checkpoint(save / f"{stem}.safetensors", model)
        vocab.save(save / f"{stem}.vocab.json")
    return {
        **run.__dict__,
        "vocab_len": len(vocab),
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": forward_flops_per_token(run, len(vocab)),
        "steps": steps,
        "tokens": history.tokens,
        "seconds": round(history.seconds, 1),
        "tokens_per_second": round(history.tokens / history.seconds),
        "precision": history.precision,
        "epochs": round(history.tokens / len(train_ids), 2),
        "nats_per_char": round(result["nats_per_char"], 4),
        "nats_per_token": round(result["nats_per_token"], 4),
    }


def markdown_table(rows: list[dict]) -> str:
    """The sweep's results as the Markdown table of docs/pretraining_sweep.md, best nats/char
    first."""
    lines = [
        "| vocab | layers x width | context x batch | optimizer | peak lr | final lr | precision | "
        "steps | tokens "
        "| train s | tokens/s | nats/char |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["nats_per_char"]):
        lines.append(
            f"| {r['vocab_len']:,} | {r['n_layer']} x {r['n_embd']} | {r['context']} x "
            f"{r['batch']} "
            f"| {r.get('optimizer', 'adamw')} | {r['lr']:g} "
            f"| {r['min_lr_ratio']:g} x | {r.get('precision', 'fp32')} | {r['steps']} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} | {r['tokens_per_second']:,} "
            f"| {r['nats_per_char']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=150.0,
        help="training time per run on this machine (steps = this x measured tokens/s)",
    )
    parser.add_argument("--only", type=int, nargs="*", help="indices into GRID")
    parser.add_argument("--save", default=None, help="folder for each run's model and vocabulary")
    parser.add_argument(
        "--jsonl", default="docs/pretraining_sweep.jsonl", help="results are appended here"
    )
    parser.add_argument(
        "--table", action="store_true", help="print --jsonl's results as a Markdown table and stop"
    )
    args = parser.parse_args()
    if args.table:
        print(
            markdown_table(
                [
                    json.loads(line)
                    for line in Path(args.jsonl).read_text().splitlines()
                    if line.strip()
                ]
            )
        )
        return
    start = time.perf_counter()
    for i in args.only if args.only else range(len(GRID)):
        run = GRID[i]
        row = run_one(run, args.budget_seconds, save=Path(args.save) if args.save else None)
        print(json.dumps(row), flush=True)
        with Path(args.jsonl).open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"sweep done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("SWEEP_THREADS", "2")))
    main()
