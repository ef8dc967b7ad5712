"""Pretraining and fine-tuning loop: AdamW, warm-up + cosine schedule, clipping, evaluation,
checkpoints.

Reproducible on CPU (same seed -> same losses), bf16 autocast where the hardware has it natively
(``TrainConfig.precision``, :mod:`minigpt.device`), MPS only on request (it has given silently
wrong losses in reported PyTorch cases), a tqdm progress bar, and safetensors checkpoints that hold
model + optimizer + step and are written atomically, so a run can resume.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minigpt import keep_freed_memory
from minigpt._progress import tqdm  # a widget in Jupyter, a text bar in saved notebooks/terminals
from minigpt._validate import UserError, UserTypeError, check_float, check_int

# Re-exported: the chapters, the lab and the command line import these from here.
from minigpt.device import (
    PRECISIONS,
    autocast,
    check_device_name,
    choose_device,
    cpu_has_native_bf16,  # noqa: F401
    cuda_has_native_bf16,  # noqa: F401
    eval_precision,
    has_native_bf16,  # noqa: F401
    resolve_precision,
)
from minigpt.io import (
    DIGEST_KEY,
    check_writable_file,
    content_digest,
    read_safetensors,
    refuse_non_finite,
    safetensors_shapes,
    safetensors_writer,
    save_or_keep,
    tensor_digest,
    verify_digest,
)
from minigpt.model import GPTConfig, GPTModel
from minigpt.muon import BatchedMuon, MuonWithAdamW


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0  # max gradient norm; None = no clipping
    eval_interval: int = 100
    eval_batches: int = 20
    seed: int = 123
    device: str | None = None
    progress: bool = True
    precision: str = "auto"  # "fp32", "bf16" (autocast) or "auto": see resolve_precision
    # "adamw", or "muon" for the blocks' weight matrices (see make_optimizer)
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        """Check every field; NumPy scalars are accepted and stored as Python numbers."""
        for name, low in (
            ("steps", 0),
            ("warmup_steps", 0),
            ("eval_interval", 1),
            ("eval_batches", 1),
        ):
            setattr(self, name, check_int(f"TrainConfig.{name}", getattr(self, name), low))
        self.seed = check_int("TrainConfig.seed", self.seed, 0, 2**32 - 1)  # NumPy's seed range
        if self.warmup_steps > self.steps:
            raise UserError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps}); "
                f"for a short run pass e.g. warmup_steps={self.steps // 10}"
            )
        self.lr = check_float("TrainConfig.lr", self.lr, 0.0, strict_min=True)
        self.min_lr = check_float("TrainConfig.min_lr", self.min_lr, 0.0, self.lr)
        self.weight_decay = check_float("TrainConfig.weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise UserTypeError(
                f"TrainConfig.betas must be a pair (beta1, beta2), got {self.betas!r}"
            )
        self.betas = tuple(
            check_float(f"TrainConfig.betas[{i}]", b, 0.0, 1.0, strict_max=True)
            for i, b in enumerate(self.betas)
        )
        # a negative clip would reverse the gradients, 0 would zero them
        if self.grad_clip is not None:
            self.grad_clip = check_float(
                "TrainConfig.grad_clip (None = no clipping)", self.grad_clip, 0.0, strict_min=True
            )
        check_device_name(self.device)
        if self.precision not in PRECISIONS:
            raise UserError(
                f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, got "
                f"{self.precision!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"TrainConfig.optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                f"{self.optimizer!r}"
            )
        if not isinstance(self.progress, (bool, np.bool_)):
            raise UserTypeError(
                f"TrainConfig.progress must be True or False, got {self.progress!r}"
            )
        self.progress = bool(self.progress)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay from ``lr`` towards ``min_lr``, reached at step
        ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (
            1 + math.cos(math.pi * min(1.0, progress))
        )


@dataclass
class History:
    """What a run measured, ready for plotting: losses in nats per token."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    precision: str = "fp32"  # what the training steps ran in: "fp32" or "bf16"


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or inf: the run stops before that update is
    applied."""

    exit_code = 1

    def __init__(self, step: int, lr: float, loss: float, grad_norm: float, checkpoint=None):
        saved = (
            f"; {checkpoint} was not written (a file already there is unchanged)"
            if checkpoint
            else ""
        )
        super().__init__(
            f"training diverged at step {step} (lr {lr:.3g}): loss {loss:.4g}, gradient norm "
            f"{grad_norm:.4g}. "
            f"The model keeps the weights from before this step{saved}. Try a lower learning rate "
            f"(e.g. lr={lr / 3:.2g}), a longer warm-up or grad_clip=1.0, and check the inputs for "
            "NaN."
        )
        self.step, self.lr, self.loss, self.grad_norm = step, lr, loss, grad_norm
        self.history: History | None = None


OPTIMIZERS = ("adamw", "muon")


def loss_fn(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats per token, over the targets that are not ``-100``
    (ignored).

    When a fine-tuning mask ignores targets, a :class:`GPTModel` computes the output head only at
    the kept positions: the same loss, without the vocabulary-wide matmul (the largest in a small
    model) for the rest.
    """
    targets = targets.flatten()
    # on a GPU the mask would cost a sync
    if isinstance(model, GPTModel) and inputs.device.type == "cpu":
        keep = targets != -100
        if not bool(keep.all()):
            logits = model.lm_head(model.hidden(inputs).flatten(0, 1)[keep])
            return F.cross_entropy(logits.float(), targets[keep])
    return F.cross_entropy(model(inputs).flatten(0, 1).float(), targets)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> float:
    """Mean loss over the first ``max_batches`` batches of ``loader`` (all of them when None).

    The batches go to ``device`` (default: the model's); ``precision`` is "fp32" or "bf16"
    (autocast), as a run resolved it (:func:`resolve_precision`, :func:`eval_precision`).
    """
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, precision):
            total += loss_fn(model, inputs.to(device), targets.to(device)).item()
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation loader yielded no batch")
    return total / count


def forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, precision: str | None = None
) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW over the trainable parameters; no weight decay on biases, LayerNorms and 1-D adapters.

    With ``cfg.optimizer == "muon"`` the weight matrices inside the blocks go to Muon instead
    (:class:`MuonWithAdamW`); the embeddings (and so the tied output head) stay with AdamW. Muon's
    Newton-Schulz iterations run in bf16 when the run's ``precision`` is "bf16", else in float32
    (None: resolved from ``cfg`` on the model's device, as :func:`train` does).
    """
    decay, no_decay, matrices = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if cfg.optimizer == "muon" and param.dim() == 2 and name.startswith("blocks."):
            matrices.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if not matrices:  # "adamw", or nothing for Muon to train
        return adamw
    # "match_rms_adamw" scales Muon's orthogonal update to AdamW's typical size (0.2 *
    # sqrt(max(rows, cols))),
    # so one learning rate and one schedule serve both optimizers (Liu et al., 2025,
    # arXiv:2502.16982, sec. 2.2).
    if precision is None:
        precision = resolve_precision(cfg.precision, matrices[0].device)
    muon = BatchedMuon(
        matrices,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
    )
    return MuonWithAdamW(adamw, muon)


def train(
    model: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    cfg: TrainConfig,
    checkpoint: Path | str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    callback: Callable[[int, torch.nn.Module], None] | None = None,
) -> History:
    """Train ``model`` for ``cfg.steps`` steps and return the loss history.

    With ``checkpoint`` the state (model, optimizer, step) is saved there at the end; with
    ``resume`` a run continues from that file's step, giving the same losses as an uninterrupted run
    on CPU. ``stop_after`` ends this call after that many steps (the schedule still spans
    ``cfg.steps``), which is how a long run is split into sessions. ``callback(step, model)`` runs
    every ``cfg.eval_interval`` steps (for measurements during training, e.g. a learning-forgetting
    curve); its time is not counted in ``History.seconds``.

    The model is moved, in place, to ``choose_device(cfg.device)`` (the GPU when there is one and
    ``cfg.device`` is None) and stays there: callers feed it inputs on ``next(model.parameters())
    .device`` afterwards, or use the entry points that move inputs themselves (``generate``,
    ``evaluate``, ``answer``). Batches may come on any device.
    """
    # before the first step: a bad destination (an empty path too) must not cost a finished run
    if checkpoint is not None:
        check_writable_file(checkpoint, "checkpoint")
    device = choose_device(cfg.device)
    keep_freed_memory()  # a fifth of a small model's CPU step went to page faults without it
    seed_everything(cfg.seed)
    model.to(device).train()
    precision = resolve_precision(cfg.precision, device)
    optimizer = make_optimizer(model, cfg, precision)
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        start = load_checkpoint(checkpoint, model, optimizer)["step"]
    history = History(precision=precision)
    batches = forever(train_loader)
    for _ in range(start):  # replay the data order so a resumed run sees the same batches
        next(batches)
    t0 = time.perf_counter()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(
        range(start, end), desc="train", disable=not cfg.progress, initial=start, total=cfg.steps
    )
    for step in bar:
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = (t.to(device) for t in next(batches))
        with autocast(device, precision):
            loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # inf: measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip or math.inf
        ).item()
        # stop before NaN reaches weights
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            diverged = TrainingDiverged(step, lr, loss.item(), grad_norm, checkpoint)
            diverged.history = history  # the steps that did run, for a caller that keeps them
            raise diverged
        optimizer.step()
        history.steps.append(step)
        history.train_loss.append(loss.item())
        history.lr.append(lr)
        history.tokens += inputs.numel()
        last = step == cfg.steps - 1
        if val_loader is not None and ((step + 1) % cfg.eval_interval == 0 or last):
            history.eval_steps.append(step + 1)
            history.val_loss.append(
                evaluate(
                    model, val_loader, cfg.eval_batches, device, eval_precision(precision, device)
                )
            )
            bar.set_postfix(
                train=f"{history.train_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}"
            )
        if callback is not None and (step + 1) % cfg.eval_interval == 0:
            paused = time.perf_counter()
            callback(step + 1, model)
            model.train()
            t0 += time.perf_counter() - paused
    history.seconds = time.perf_counter() - t0
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, optimizer, step=end)
    return history


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _model_tensors(model: torch.nn.Module, shared: bool = True) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: a tied head is stored once, as the token embedding.
    # shared=False: names and shapes only, of a model on the meta device (no storage to compare).
    if not shared:
        tied = getattr(getattr(model, "cfg", None), "tie_weights", False)
        return {
            f"model.{name}": tensor
            for name, tensor in model.state_dict().items()
            if not (tied and name.endswith("lm_head.weight"))
        }
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and name.endswith("lm_head.weight"):
            continue
        seen.add(tensor.data_ptr())
        tensors[f"model.{name}"] = tensor.detach().contiguous().cpu()
    return tensors


def save_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra: dict | None = None,
) -> None:
    """Save model (+ optimizer state + step) to one safetensors file, atomically.

    Weights holding NaN or inf are refused (naming the tensor). The metadata records a digest of
    every tensor and every metadata entry (config, step, ``extra`` such as the recipe and the
    vocabulary's hash), which :func:`load_checkpoint` verifies. When the OS refuses the write (disk
    full), the checkpoint is kept in a fallback file that the error names.
    """
    tensors = _model_tensors(model)
    refuse_non_finite(tensors, f"refusing to save checkpoint {path}")
    meta = {"step": str(step), "format": "minigpt-checkpoint-1", "extra": json.dumps(extra or {})}
    if isinstance(model, GPTModel):
        meta["config"] = json.dumps(model.cfg.to_dict())
    if optimizer is not None:
        state = optimizer.state_dict()
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta["optim_groups"] = json.dumps(state["param_groups"])
    meta[DIGEST_KEY] = json.dumps(content_digest(tensors, meta))
    save_or_keep(safetensors_writer(tensors, meta), path, f"checkpoint {path}")


def read_checkpoint_metadata(path: Path | str) -> dict:
    """The checkpoint's metadata with ``config``, ``extra`` and ``optim_groups`` parsed from
    JSON."""
    meta, _ = read_safetensors(path, "checkpoint", with_tensors=False)
    if meta.get("format") != "minigpt-checkpoint-1":
        raise UserError(f"{path} is not a minigpt checkpoint (format={meta.get('format')!r})")
    try:
        meta["step"] = int(meta.get("step", "0"))
        for key, kind in (("config", dict), ("extra", dict), ("optim_groups", list)):
            if key in meta:
                meta[key] = json.loads(meta[key])
                if not isinstance(meta[key], kind):
                    raise TypeError(
                        f"its {key!r} entry is {json.dumps(meta[key])[:40]}, not a JSON "
                        f"{'object' if kind is dict else 'list'}"
                    )
    except (ValueError, TypeError) as err:
        raise UserError(
            f"checkpoint {path} has unreadable metadata ({err}); the file is damaged"
        ) from None
    return meta


def load_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    vocab_sha256: str | None = None,
) -> dict:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns ``{"step", "extra"}``.

    A checkpoint from another configuration is refused with the differing fields named, one whose
    tensors or metadata differ from its recorded digest with the parts named, and, with
    ``vocab_sha256``, one that records another vocabulary. A file without a digest loads with a
    warning (nothing can prove what it holds).
    """
    # The digest first, then the entries' types (read_checkpoint_metadata), then their values.
    raw, tensors = read_safetensors(path, "checkpoint")
    if raw.get("format") != "minigpt-checkpoint-1":
        raise UserError(f"{path} is not a minigpt checkpoint (format={raw.get('format')!r})")
    fields = {key: value for key, value in raw.items() if key != DIGEST_KEY}
    if not verify_digest(path, "checkpoint", raw.get(DIGEST_KEY), tensors, fields):
        if "sha256" in raw and tensor_digest(tensors) != raw["sha256"]:  # tensors-only hash
            raise UserError(
                f"checkpoint {path} is corrupted: its tensors do not match the SHA-256 recorded "
                "when it was saved; delete it and train (or copy) it again"
            )
        warnings.warn(
            f"checkpoint {path} records no digest of its config and metadata, so a changed config "
            "cannot be detected; save it again with save_checkpoint to add one",
            stacklevel=2,
        )
    meta = read_checkpoint_metadata(path)
    check_checkpoint_vocab(path, meta, vocab_sha256)
    if isinstance(model, GPTModel) and "config" in meta:
        saved = meta["config"]
        diff = {
            k: (v, getattr(model.cfg, k, None))
            for k, v in saved.items()
            if getattr(model.cfg, k, None) != v
        }
        if diff:
            raise UserError(
                f"checkpoint {path} was saved from another config; (saved, model) differ in {diff}"
            )
    refuse_non_finite(tensors, f"checkpoint {path}")
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    if getattr(getattr(model, "cfg", None), "tie_weights", False):
        state.setdefault("lm_head.weight", state.get("tok_emb.weight"))
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    if optimizer is not None:
        if "optim_groups" not in meta:
            raise UserError(f"checkpoint {path} holds no optimizer state")
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optim_groups"]})
    return {"step": meta["step"], "extra": meta.get("extra", {})}


def load_model(
    path: Path | str, device: str | None = None, vocab_sha256: str | None = None
) -> GPTModel:
    """Rebuild a ``GPTModel`` from a checkpoint's stored config and weights, on
    ``choose_device(device)`` (the GPU when there is one and ``device`` is None)."""
    meta = read_checkpoint_metadata(path)
    check_checkpoint_vocab(path, meta, vocab_sha256)
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"checkpoint {path} stores no GPTConfig")
    try:
        cfg = GPTConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as err:
        raise UserError(f"checkpoint {path} stores an invalid GPTConfig ({err})") from None
    # The config's shapes against the file's header, before a weight is allocated: a damaged
    # size must not ask for terabytes.
    with torch.device("meta"):
        expected = _model_tensors(GPTModel(cfg), shared=False)
    stored = safetensors_shapes(path, "checkpoint")
    for name, tensor in expected.items():
        if name in stored and stored[name] != tuple(tensor.shape):
            raise UserError(
                f"checkpoint {path}: its config implies {name} of shape {tuple(tensor.shape)}, "
                f"the file holds {stored[name]}; the config or the file is damaged"
            )
    model = GPTModel(cfg)
    load_checkpoint(path, model)
    return model.to(choose_device(device))


def check_checkpoint_vocab(path: Path | str, meta: dict, vocab_sha256: str | None) -> None:
    """Refuse a checkpoint whose ``extra`` records a vocabulary hash other than ``vocab_sha256``."""
    extra = meta.get("extra")
    saved = extra.get("vocab_sha256") if isinstance(extra, dict) else None
    if vocab_sha256 is not None and saved is not None and saved != vocab_sha256:
        raise UserError(
            f"checkpoint {path} was trained with another vocabulary (sha256 {str(saved)[:12]}...) "
            f"than the one in use ({vocab_sha256[:12]}...); its token ids would mean other tokens"
        )


@torch.no_grad()
def nats_per_character(
    model: torch.nn.Module, token_ids: np.ndarray, decode, batch_size: int = 32
) -> dict:
    """Total next-token loss over non-overlapping windows of ``token_ids``, per token and per
    character.

    Per character = total nats / number of characters those target tokens decode to: a measure that
    does not depend on the tokenizer, so a word-piece model can be compared with a character-level
    one."""
    context = model.cfg.context_length
    n_windows = (len(token_ids) - 1) // context
    if n_windows == 0:
        raise ValueError(f"token_ids must hold more than context_length = {context} tokens")
    ids = torch.as_tensor(np.asarray(token_ids[: n_windows * context + 1]), dtype=torch.long)
    inputs, targets = ids[:-1].view(n_windows, context), ids[1:].view(n_windows, context)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, n_windows, batch_size):
        x, y = (
            inputs[start : start + batch_size].to(device),
            targets[start : start + batch_size].to(device),
        )
        logits = model(x).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train(was_training)
    n_chars = len(decode(targets.flatten().tolist()))
    n_tokens = targets.numel()
    return {
        "nats_per_token": total / n_tokens,
        "nats_per_char": total / n_chars,
        "bits_per_char": total / n_chars / math.log(2),
        "tokens": n_tokens,
        "chars": n_chars,
    }
