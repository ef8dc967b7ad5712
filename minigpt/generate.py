"""Decoding: greedy, temperature and top-k sampling, stopping at end-of-text.

Temperature divides the logits before the softmax (T < 1 sharpens, T > 1 flattens); top-k keeps only
the k most likely tokens (Fan et al., 2018). ``temperature=0`` means greedy: always the most likely
token.
"""

from __future__ import annotations

import torch

from minigpt._validate import UserError, check_float, check_int
from minigpt.model import GPTModel, check_token_ids


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, vocab_size: int | None = None
) -> tuple[int, float, int | None]:
    """The sampling settings as Python numbers, or a :class:`~minigpt.io.UserError` naming the bad
    one."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    temperature = check_float("temperature (0 = greedy)", temperature, 0.0)
    if top_k is not None:
        top_k = check_int("top_k (None = no limit)", top_k, 1, vocab_size)
    return max_new_tokens, temperature, top_k


def last_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The next-token logits at the last position, (batch, vocab). A :class:`GPTModel` applies its
    output head to that position alone: the vocabulary-wide matmul is the largest of a small model,
    and decoding needs no other position."""
    if isinstance(model, GPTModel):
        return model.lm_head(model.hidden(idx)[:, -1])
    return model(idx)[:, -1, :]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens; stop early when every row
    emitted ``eos_id``.

    Rows that finished keep receiving ``eos_id`` so the batch stays rectangular. ``idx`` may be on
    any device: its ids are checked where they are (on the CPU, before any kernel), then moved to
    the model's device, where the result is returned; a ``generator`` must be on that device.
    """
    if idx.dim() != 2:
        raise UserError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
    max_new_tokens, temperature, top_k = check_sampling(
        max_new_tokens, temperature, top_k, model.cfg.vocab_size
    )
    context = model.cfg.context_length
    # Only the last `context` ids reach the model, so only they need to fit its vocabulary.
    check_token_ids(idx[:, -context:], model.cfg.vocab_size, context, idx.device.type == "cpu")
    idx = idx.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = last_logits(model, idx[:, -context:]).float()
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        if eos_id is not None:
            next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_id), next_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None and finished.all():
            break
    model.train(was_training)
    return idx


def generate_text(
    model: torch.nn.Module,
    prompt: str,
    encode,
    decode,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> str:
    """Prompt in, continuation out (without the prompt), using the given ``encode``/``decode``
    functions."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode(prompt)], dtype=torch.long)  # checked on the CPU by generate()
    if ids.shape[1] == 0:
        raise UserError("prompt must encode to at least one token (it is empty)")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = generate(model, ids, max_new_tokens, temperature, top_k, eos_id, generator)[
        0, ids.shape[1] :
    ]
    tokens = out.tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return decode(tokens)
