"""The course's own pretrained mini GPT-2: one recipe, trained once, shared by chapters 05-10.

Chapter 05 trains it (about 3 minutes on 2 CPU cores) and saves it to the cache; the fine-tuning
chapters call :func:`get_pretrained` and get the same weights back, training them first if needed.
The cache folder is ``$MINIGPT_CACHE`` or ``~/.cache/minigpt``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.data import encoded, make_loader, train_val_split
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import COMPACT_VOCAB_FILE
from minigpt.train import History, TrainConfig, load_model, seed_everything, train


@dataclass(frozen=True)
class Recipe:
    preset: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 123

    @property
    def name(self) -> str:
        """Cache file stem; it includes a fingerprint of the vocabulary, which the weights depend on."""
        vocab = hashlib.sha256(COMPACT_VOCAB_FILE.read_bytes()).hexdigest()[:8]
        return f"{self.preset}-s{self.steps}-b{self.batch_size}-lr{self.lr:g}-seed{self.seed}-vocab{vocab}"


# Measured on 2 CPU cores: ~3 minutes, validation loss ~1.6 nats per character (see README).
TINY = Recipe(preset="tiny", steps=1000, batch_size=16, lr=3e-3)
# Smoke mode: seconds, for tests. The model is tiny and barely trained: only the plumbing is checked.
SMOKE = Recipe(preset="micro", steps=30, batch_size=8, lr=3e-3)


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def recipe_for(smoke: bool | None = None) -> Recipe:
    if smoke is None:
        from minigpt.notebooks import smoke_mode

        smoke = smoke_mode()
    return SMOKE if smoke else TINY


def shakespeare_split(val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Shakespeare in compact-vocabulary ids, split into training and validation tokens."""
    return train_val_split(encoded("shakespeare"), val_fraction)


def pretrain(recipe: Recipe = TINY, progress: bool = True, checkpoint: Path | str | None = None,
             device: str | None = None) -> tuple[GPTModel, History]:
    """Train a fresh model on Shakespeare following ``recipe``; returns the model and its history."""
    cfg = GPTConfig.from_preset(recipe.preset)
    seed_everything(recipe.seed)
    model = GPTModel(cfg)
    train_ids, val_ids = shakespeare_split()
    train_loader = make_loader(train_ids, cfg.context_length, recipe.batch_size, seed=recipe.seed)
    val_loader = make_loader(val_ids, cfg.context_length, 32, shuffle=False)
    history = train(model, train_loader, val_loader,
                    TrainConfig(steps=recipe.steps, lr=recipe.lr, min_lr=recipe.lr / 10,
                                warmup_steps=min(50, recipe.steps // 10), eval_interval=max(1, recipe.steps // 10),
                                eval_batches=10, seed=recipe.seed, device=device, progress=progress),
                    checkpoint=checkpoint)
    return model, history


def get_pretrained(smoke: bool | None = None, progress: bool = True, device: str | None = None) -> GPTModel:
    """The course's pretrained model, from the cache when present, else trained now and cached."""
    recipe = recipe_for(smoke)
    path = cache_dir() / f"{recipe.name}.safetensors"
    if path.is_file():
        return load_model(path, device)
    model, _ = pretrain(recipe, progress=progress, checkpoint=path, device=device)
    return model.eval()
