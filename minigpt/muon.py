"""Muon for the blocks' weight matrices, AdamW for the rest: the faster optimizer that chapter 05
compares with AdamW (and whose flat spectra it shows).

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) keeps a Nesterov momentum of
each matrix's gradient and, instead of stepping along it, steps along the nearest semi-orthogonal
matrix: for a momentum with SVD ``U S V^T`` the update is about ``U V^T``, so every direction of the
update moves at the same rate, not just the few that dominate the gradient. Five Newton-Schulz
iterations of the quintic ``X <- a X + (b G + c G^2) X`` with ``G = X X^T`` compute it approximately
(singular values land in roughly 0.7-1.2 rather than exactly 1, which the authors found does not
hurt). Muon is defined for matrices; token and position embeddings (and so the tied output head),
biases and LayerNorms keep AdamW, as in its authors' code. Liu et al. (2025, "Muon is Scalable for
LLM Training", arXiv:2502.16982, sec. 2.2) scale the update by ``0.2 sqrt(max(rows, cols))`` so that
its RMS matches AdamW's and one learning rate serves both (``adjust_lr_fn="match_rms_adamw"``). In
``scripts/sweep_pretraining.py`` it lowered held-out Shakespeare from about 1.57 to 1.49 nats per
character in the same three CPU minutes (``docs/pretraining_sweep.md``); the course's base is
pretrained with AdamW all the same, for the spectra its fine-tuning chapters need.
"""

from __future__ import annotations

import math

import torch

from minigpt._validate import UserError

# The quintic's coefficients (Jordan et al.), chosen for the steepest slope at zero;
# torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# How the step is scaled for a matrix's shape: None or "original" (Jordan et al.), "match_rms_adamw"
# (Liu et al.).
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class BatchedMuon(torch.optim.Optimizer):
    """Muon with the Newton-Schulz iterations of same-shaped matrices run as one batch.

    The same algorithm, defaults and state as ``torch.optim.Muon`` (torch 2.9 and later;
    ``tests/test_train.py`` compares the two step for step), written here so that the course also
    runs on the older torch its requirements allow, and batched: one matmul for the sixteen 128 x
    128 attention matrices of the tiny model instead of sixteen small ones. On 2 CPU cores the
    optimizer step took 23 ms with ``torch.optim.Muon`` and 13-15 ms batched, in a training step of
    about 125 ms.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        # ns_dtype: bf16 as in torch.optim.Muon; train() passes float32 where the run's precision
        # is fp32 (no native bf16, or fp32 asked for). An attribute, not a group setting: the
        # groups are saved as JSON in checkpoints, and the dtype changes no state.
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise UserError(f"ns_dtype must be torch.bfloat16 or torch.float32, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise UserError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise UserError(
                f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_coefficients=ns_coefficients,
                eps=eps,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            ),
        )
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 2:
                    raise UserError(
                        f"Muon trains matrices only; got a parameter of shape {tuple(param.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for param in params:
                if "momentum_buffer" not in self.state[param]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(param.grad)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = (
                torch._foreach_lerp(grads, buffers, group["momentum"])
                if group["nesterov"]
                else buffers
            )
            # decoupled weight decay
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = {}
            for i, param in enumerate(params):
                by_shape.setdefault(param.shape, []).append(i)
            for shape, index in by_shape.items():
                orthogonal = newton_schulz(
                    torch.stack([updates[i] for i in index]),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    self.ns_dtype,
                )
                torch._foreach_add_(
                    [params[i] for i in index],
                    list(orthogonal.unbind(0)),
                    alpha=-group["lr"] * update_scale(group["adjust_lr_fn"], shape),
                )
        return loss


def newton_schulz(
    matrices: torch.Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately ``U V^T`` for each matrix ``U S V^T`` of a (batch, rows, cols) stack, computed
    in ``dtype`` (bf16 by default, as ``torch.optim.Muon``)."""
    if matrices.dim() != 3:
        raise UserError(
            f"matrices must be a (batch, rows, cols) stack, got shape {tuple(matrices.shape)}; "
            "for one matrix m pass m[None]"
        )
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: the Gram matrix X X^T is then the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # every singular value now <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def update_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor on the learning rate for a matrix of ``shape``, as ``torch.optim.Muon`` computes
    it."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # Liu et al.: the RMS of an AdamW update
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # Jordan et al.


class MuonWithAdamW:
    """Muon for the blocks' weight matrices, AdamW for everything else, stepped together as one
    optimizer.

    ``train`` sets ``group["lr"]`` on :attr:`param_groups` (one schedule for both) and checkpoints
    :meth:`state_dict`, as for a single optimizer.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: BatchedMuon):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def state_dict(self) -> dict:
        """One ``{"state", "param_groups"}`` dictionary: Muon's parameter ids follow AdamW's."""
        first, second = self.adamw.state_dict(), self.muon.state_dict()
        offset = sum(len(g["params"]) for g in first["param_groups"])
        shifted = [
            {**g, "params": [i + offset for i in g["params"]]} for g in second["param_groups"]
        ]
        state = {**first["state"], **{i + offset: v for i, v in second["state"].items()}}
        return {"state": state, "param_groups": first["param_groups"] + shifted}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        n_first = len(self.adamw.param_groups)
        if len(groups) != n_first + len(self.muon.param_groups):
            raise UserError(
                f"optimizer state has {len(groups)} parameter groups; Muon with AdamW expects "
                f"{n_first + len(self.muon.param_groups)} (was it saved by another optimizer?)"
            )
        offset = sum(len(g["params"]) for g in groups[:n_first])
        state = {int(i): v for i, v in state_dict["state"].items()}
        self.adamw.load_state_dict(
            {
                "state": {i: v for i, v in state.items() if i < offset},
                "param_groups": groups[:n_first],
            }
        )
        self.muon.load_state_dict(
            {
                "state": {i - offset: v for i, v in state.items() if i >= offset},
                "param_groups": [
                    {**g, "params": [i - offset for i in g["params"]]} for g in groups[n_first:]
                ],
            }
        )
