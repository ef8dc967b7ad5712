"""The fine-tuning setup every PEFT chapter shares: data, task, and the three numbers we report.

The pretrained mini GPT knows Shakespeare. Fine-tuning moves it to a new domain, CPython's reference
documentation, mixed with a small instruction task (``Reverse: python -> nohtyp``, ``Add: 23 + 45 = 68``).
After fine-tuning we measure:

* **domain loss**: next-token loss on held-out documentation (nats per token);
* **task accuracy**: exact match of greedy answers on freshly sampled task prompts;
* **forgetting**: next-token loss on held-out Shakespeare, the original corpus (Biderman et al., 2024,
  "LoRA Learns Less and Forgets Less", arXiv:2405.09673).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch

from minigpt.data import (Example, exact_match_accuracy, make_loader, make_task_examples, python_docs_text,
                          train_val_split)
from minigpt.tokenizer import get_compact_vocab
from minigpt.train import evaluate


@dataclass(frozen=True)
class FinetuneData:
    train_ids: np.ndarray  # documentation paragraphs and task lines, shuffled together
    domain_val_ids: np.ndarray  # held-out documentation
    shakespeare_val_ids: np.ndarray  # held-out Shakespeare, for forgetting
    task_eval: tuple[Example, ...]  # held-out task prompts


@functools.lru_cache(maxsize=2)
def finetune_data(n_task_examples: int = 12000, n_eval: int = 200, seed: int = 0) -> FinetuneData:
    """Documentation + task training stream, and the held-out sets; deterministic for a seed."""
    from minigpt.pretrained import shakespeare_split  # pretrained imports train/model; keep it local

    vocab = get_compact_vocab()
    paragraphs = [p + "\n\n" for p in python_docs_text().split("\n\n") if p.strip()]
    cut = int(len(paragraphs) * 0.9)
    documents = paragraphs[:cut] + [e.text for e in make_task_examples(n_task_examples, seed=seed)]
    random.Random(seed).shuffle(documents)
    train_ids = np.asarray(vocab.encode("".join(documents)), dtype=np.int64)
    domain_val = np.asarray(vocab.encode("".join(paragraphs[cut:])), dtype=np.int64)
    task_eval = tuple(make_task_examples(n_eval, seed=seed + 1_000_003))
    return FinetuneData(train_ids, domain_val, shakespeare_split()[1], task_eval)


def finetune_loaders(data: FinetuneData, context_length: int, batch_size: int, seed: int = 0):
    """(train, domain validation, Shakespeare validation) loaders for a model's context length."""
    return (make_loader(data.train_ids, context_length, batch_size, seed=seed),
            make_loader(data.domain_val_ids, context_length, 32, shuffle=False),
            make_loader(data.shakespeare_val_ids, context_length, 32, shuffle=False))


@torch.no_grad()
def answer(model: torch.nn.Module, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy answers to ``prompts`` (text up to the first newline), batched by prompt length."""
    vocab = get_compact_vocab()
    device = next(model.parameters()).device
    encoded = [vocab.encode(p) for p in prompts]
    answers: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    for length, rows in by_length.items():
        idx = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.cfg.context_length:])[:, -1, :]
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
        for row, ids in zip(rows, idx[:, length:].tolist()):
            answers[row] = vocab.decode(ids).split("\n")[0]
    model.train(was_training)
    return answers


def task_accuracy(model: torch.nn.Module, examples: tuple[Example, ...] | list[Example]) -> float:
    """Exact-match accuracy of greedy answers on ``examples``."""
    return exact_match_accuracy(answer(model, [e.prompt for e in examples]), list(examples))


def measure(model: torch.nn.Module, data: FinetuneData, batch_size: int = 32, max_batches: int = 20) -> dict:
    """Domain loss, forgetting (Shakespeare loss) and task accuracy of a model, in one dictionary."""
    _, domain_val, shakespeare_val = finetune_loaders(data, model.cfg.context_length, batch_size)
    return {"domain_loss": evaluate(model, domain_val, max_batches),
            "shakespeare_loss": evaluate(model, shakespeare_val, max_batches),
            "task_accuracy": task_accuracy(model, data.task_eval)}
