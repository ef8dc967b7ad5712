"""The fine-tuning setup every PEFT chapter shares: data, task, and the three numbers we report.

The pretrained mini GPT knows Shakespeare and has read a quarter of CPython's reference
documentation (:func:`minigpt.data.docs_parts`). Fine-tuning moves it further into that domain, on
some of the documentation's other paragraphs, mixed with a small instruction task built from words
it knows well: ``Turn not lord you:`` -> ``you lord not`` (:func:`minigpt.data.make_task_examples`),
with the loss on the answers only. After fine-tuning we measure:

* **domain loss**: next-token loss on held-out documentation (nats per token);
* **task accuracy**: exact match of greedy answers on prompts whose word triples training never saw;
* **forgetting**: next-token loss on held-out Shakespeare, the original corpus (Biderman et al.,
  2024, "LoRA Learns Less and Forgets Less", arXiv:2405.09673).

Learning rates are chosen on a separate validation set of task prompts
(:attr:`FinetuneData.task_val`), never on the prompts we report.
"""

from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from minigpt.data import (
    Example,
    docs_parts,
    encode_examples,
    encoded,
    exact_match_accuracy,
    make_loader,
    make_task_examples,
)
from minigpt.generate import last_logits
from minigpt.model import check_token_ids
from minigpt.tokenizer import get_compact_vocab
from minigpt.train import evaluate

# tokens per training row: a task example is ~9 tokens, a paragraph a few dozen
FINETUNE_CONTEXT = 32


@dataclass(frozen=True)
class FinetuneData:
    train_ids: np.ndarray  # documentation paragraphs and task examples, shuffled together
    # True where a token counts in the loss: all documentation, task answers only
    train_mask: np.ndarray
    domain_val_ids: np.ndarray  # held-out documentation
    shakespeare_val_ids: np.ndarray  # held-out Shakespeare, for forgetting
    task_val: tuple[Example, ...]  # prompts for choosing learning rates
    task_eval: tuple[Example, ...]  # prompts we report: triples disjoint from training's


# The mix: 40,000 task examples (about 360 K tokens) and 30 % of the fine-tuning documentation
# (about 50 K tokens). With the whole documentation share the task got too few steps to be learnt;
# with no documentation at all, fine-tuning damaged the documentation loss too.
TASK_EXAMPLES = 40_000


DOCS_SHARE = 0.3


@functools.lru_cache(maxsize=2)
def finetune_data(
    n_task_examples: int = TASK_EXAMPLES,
    n_eval: int = 200,
    n_val: int = 100,
    seed: int = 0,
    docs_share: float = DOCS_SHARE,
) -> FinetuneData:
    """Documentation + task training stream with its loss mask, and the held-out sets;
    deterministic."""
    vocab = get_compact_vocab()
    examples = make_task_examples(n_task_examples, seed=seed)
    paragraphs = [
        p for p in docs_parts()["finetune"] if zlib.crc32(p.encode()) % 1000 < 1000 * docs_share
    ]
    documents = [(p, None) for p in paragraphs] + [("", e) for e in examples]
    random.Random(seed).shuffle(documents)
    ids, mask = [], []
    for text, example in documents:
        if example is None:
            tokens = np.asarray(vocab.encode(text), dtype=np.int64)
            ids.append(tokens)
            mask.append(np.ones(len(tokens), dtype=bool))
        else:
            tokens, answer_mask = encode_examples([example], vocab.encode)
            ids.append(tokens)
            mask.append(answer_mask)
    held_out = make_task_examples(n_eval + n_val, seed=seed + 1_000_003, held_out=True)
    return FinetuneData(
        np.concatenate(ids),
        np.concatenate(mask),
        encoded("docs_validation"),
        encoded("shakespeare_val"),
        tuple(held_out[n_eval:]),
        tuple(held_out[:n_eval]),
    )


def finetune_context(model: torch.nn.Module) -> int:
    """Row length for fine-tuning a model: ``FINETUNE_CONTEXT``, or the model's context if
    shorter."""
    return min(FINETUNE_CONTEXT, model.cfg.context_length)


def finetune_loaders(data: FinetuneData, context_length: int, batch_size: int, seed: int = 0):
    """(train, domain validation, Shakespeare validation) loaders; training targets are masked."""
    return (
        make_loader(
            data.train_ids, context_length, batch_size, seed=seed, loss_mask=data.train_mask
        ),
        make_loader(data.domain_val_ids, context_length, 32, shuffle=False),
        make_loader(data.shakespeare_val_ids, context_length, 32, shuffle=False),
    )


@functools.lru_cache(maxsize=1)
def newline_token_ids() -> tuple[int, ...]:
    """The compact vocabulary's tokens whose text holds a newline."""
    vocab = get_compact_vocab()
    return tuple(i for i in range(len(vocab)) if "\n" in vocab.decode([i]))


@torch.no_grad()
def answer(model: torch.nn.Module, prompts: list[str], max_new_tokens: int = 6) -> list[str]:
    """Greedy answers to ``prompts`` (text up to the first newline), batched by prompt length, on
    the model's device."""
    vocab = get_compact_vocab()
    device = next(model.parameters()).device
    context = model.cfg.context_length
    encoded = [vocab.encode(p) for p in prompts]
    answers: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    # an answer ends at its first newline: once every row has one, later tokens cannot change it
    line_ends = torch.tensor(newline_token_ids(), device=device)
    was_training = model.training
    model.eval()
    for length, rows in by_length.items():
        idx = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
        # checked on the CPU, before any kernel (on a GPU a bad id would be a device-side assert)
        check_token_ids(idx[:, -context:], model.cfg.vocab_size, context)
        idx = idx.to(device)
        ended = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = last_logits(model, idx[:, -context:])
            next_ids = logits.argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_ids], dim=1)
            ended |= torch.isin(next_ids[:, 0], line_ends)
            if bool(ended.all()):
                break
        for row, ids in zip(rows, idx[:, length:].tolist(), strict=True):
            answers[row] = vocab.decode(ids).split("\n")[0]
    model.train(was_training)
    return answers


def task_accuracy(model: torch.nn.Module, examples: tuple[Example, ...] | list[Example]) -> float:
    """Exact-match accuracy of greedy answers on ``examples``."""
    return exact_match_accuracy(answer(model, [e.prompt for e in examples]), list(examples))


def measure(
    model: torch.nn.Module, data: FinetuneData, batch_size: int = 32, max_batches: int = 20
) -> dict:
    """Domain loss, forgetting (Shakespeare loss) and task accuracy of a model, in one
    dictionary."""
    _, domain_val, shakespeare_val = finetune_loaders(data, finetune_context(model), batch_size)
    return {
        "domain_loss": evaluate(model, domain_val, max_batches),
        "shakespeare_loss": evaluate(model, shakespeare_val, max_batches),
        "task_accuracy": task_accuracy(model, data.task_eval),
    }
