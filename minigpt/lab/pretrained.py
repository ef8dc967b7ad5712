"""The course's own pretrained mini GPT-2: one recipe, trained once, shared by chapters 05-10.

Chapter 05 trains it (about 3 minutes on 2 CPU cores) and saves it to the cache; the fine-tuning
chapters call :func:`get_pretrained` and get the same weights back, training them first if needed.
The cache folder is ``$MINIGPT_CACHE`` or ``~/.cache/minigpt``. A cached file records its recipe,
the vocabulary's SHA-256 and a hash of its tensors; one that does not match (another recipe, an
edited vocabulary, flipped bytes, NaN) is trained again, with a warning saying why.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from minigpt._validate import UserError
from minigpt.data import encoded, make_loader, unseen_share
from minigpt.io import DIGEST_KEY, cache_dir, check_writable_file, writable_cache_dir
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import COMPACT_VOCAB_FILE, compact_vocab_sha256
from minigpt.train import (
    History,
    TrainConfig,
    choose_device,
    load_model,
    read_checkpoint_metadata,
    resolve_precision,
    save_checkpoint,
    seed_everything,
    train,
)


@dataclass(frozen=True)
class Recipe:
    preset: str
    steps: int
    batch_size: int
    lr: float
    seed: int = 123
    # TrainConfig.precision: bf16 autocast where the hardware has it, else fp32
    precision: str = "auto"
    optimizer: str = "adamw"  # TrainConfig.optimizer: "adamw", or "muon" for the blocks' matrices
    device: str | None = None  # where the steps run: choose_device(device), the GPU if there is one

    @property
    def name(self) -> str:
        """Cache file stem; it includes a fingerprint of the vocabulary, and the device type (off
        the CPU) and precision the steps run in, which the weights depend on."""
        vocab = hashlib.sha256(COMPACT_VOCAB_FILE.read_bytes()).hexdigest()[:8]
        device = choose_device(self.device)
        precision = resolve_precision(self.precision, device)
        # CPU names carry no device, so one CPU cache serves with or without an explicit "cpu".
        where = "" if device.type == "cpu" else f"-{device.type}"
        optimizer = "" if self.optimizer == "adamw" else f"-{self.optimizer}"
        return (
            f"{self.preset}-s{self.steps}-b{self.batch_size}-lr{self.lr:g}{optimizer}-seed{self.seed}"
            f"-vocab{vocab}{where}-{precision}"
        )


# AdamW, as GPT-2 and every model of the LoRA, PiSSA and DoRA papers were pretrained: it leaves
# weight matrices whose top singular directions hold most of the energy, the structure PiSSA and
# DoRA act on (Muon, the faster optimizer of chapter 05, leaves the flat spectra of noise). Short
# windows in large batches (64 x 32) and lr 6e-3 with a tenth at the end gave the best held-out
# nats/char of scripts/sweep_pretraining.py's AdamW rows in about three CPU minutes.
TINY = Recipe(preset="tiny", steps=1400, batch_size=64, lr=6e-3)


# Smoke mode: seconds, for tests. The model is tiny and barely trained: only the plumbing is
# checked.
SMOKE = Recipe(preset="micro", steps=30, batch_size=8, lr=3e-3)


def recipe_for(smoke: bool | None = None) -> Recipe:
    if smoke is None:
        from minigpt import smoke_mode

        smoke = smoke_mode()
    return SMOKE if smoke else TINY


def shakespeare_split() -> tuple[np.ndarray, np.ndarray]:
    """Shakespeare in compact-vocabulary ids: training part and held-out part (the last tenth)."""
    return encoded("shakespeare_train"), encoded("shakespeare_val")


def pretraining_ids() -> np.ndarray:
    """What pretraining reads: Shakespeare's training part, then the documentation's pretraining
    share."""
    return np.concatenate([encoded("shakespeare_train"), encoded("docs_pretrain")])


def unseen_in_finetuning() -> float:
    """The share of fine-tuning tokens (documentation and task) whose id pretraining never saw; goal
    0.

    Such a token's tied embedding row is never trained, except as a target pushed towards "never
    predict me", and adapters on the blocks cannot repair it (chapter 05 shows the effect).
    """
    from minigpt.data import encode_examples, make_task_examples
    from minigpt.tokenizer import get_compact_vocab

    task, _ = encode_examples(
        make_task_examples(1000) + make_task_examples(200, held_out=True),
        get_compact_vocab().encode,
    )
    finetuning = np.concatenate([encoded("docs_finetune"), encoded("docs_validation"), task])
    return unseen_share(pretraining_ids(), finetuning)


def pretrain(
    recipe: Recipe = TINY,
    progress: bool = True,
    checkpoint: Path | str | None = None,
    device: str | None = None,
) -> tuple[GPTModel, History]:
    """Train a fresh model on :func:`pretraining_ids` following ``recipe``; returns the model and
    its history.

    The validation loss it reports is on held-out Shakespeare. The steps run on ``device`` (None:
    ``recipe.device``), where the returned model stays; the checkpoint records the recipe with
    that device.
    """
    if device is not None:
        recipe = replace(recipe, device=device)
    # before the steps: a bad destination (an empty path too) must not cost a finished run
    if checkpoint is not None:
        check_writable_file(checkpoint, "checkpoint")
    cfg = GPTConfig.from_preset(recipe.preset)
    seed_everything(recipe.seed)
    model = GPTModel(cfg)
    train_ids, val_ids = pretraining_ids(), shakespeare_split()[1]
    train_loader = make_loader(train_ids, cfg.context_length, recipe.batch_size, seed=recipe.seed)
    val_loader = make_loader(val_ids, cfg.context_length, 32, shuffle=False)
    history = train(
        model,
        train_loader,
        val_loader,
        TrainConfig(
            steps=recipe.steps,
            lr=recipe.lr,
            min_lr=recipe.lr / 10,
            warmup_steps=min(50, recipe.steps // 10),
            eval_interval=max(1, recipe.steps // 10),
            eval_batches=10,
            seed=recipe.seed,
            device=recipe.device,
            progress=progress,
            precision=recipe.precision,
            optimizer=recipe.optimizer,
        ),
    )
    # written only after a finished run: a diverged one raises above and leaves the file
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, step=recipe.steps, extra=recipe_metadata(recipe))
    return model, history


def vocab_fingerprint() -> str:
    return compact_vocab_sha256()


def recipe_metadata(recipe: Recipe) -> dict:
    """What a pretrained checkpoint records about itself (its ``extra`` metadata)."""
    return {
        "recipe": recipe.name,
        "recipe_fields": asdict(recipe),
        "vocab_sha256": vocab_fingerprint(),
    }


def checkpoint_recipe(path: Path | str) -> str | None:
    """The recipe name a checkpoint records, or None for a checkpoint without one."""
    extra = read_checkpoint_metadata(path).get("extra")
    return extra.get("recipe") if isinstance(extra, dict) else None


def refuse_overwrite(path: Path | str, recipe: Recipe, force: bool = False) -> None:
    """Refuse to replace a file at ``path`` unless it is a checkpoint of ``recipe`` (or
    ``force``)."""
    path = Path(path)
    if force or not path.exists():
        return
    try:
        saved = checkpoint_recipe(path)
    except (UserError, OSError):
        saved = None
    if saved != recipe.name:
        held = (
            f"a checkpoint of recipe {saved}"
            if saved
            else "a file that is not a checkpoint of this recipe"
        )
        raise UserError(
            f"{path} already holds {held}; this run is recipe {recipe.name}. Choose another "
            "output path (--out), or pass --force to replace it"
        )


def load_pretrained(path: Path | str, recipe: Recipe, device: str | None = None) -> GPTModel:
    """A cached checkpoint of ``recipe``, verified: recipe, vocabulary, tensor hash, finite
    weights."""
    extra = read_checkpoint_metadata(path).get("extra")
    extra = extra if isinstance(extra, dict) else {}
    if extra.get("recipe") != recipe.name:
        raise UserError(f"{path} records recipe {extra.get('recipe')!r}, not {recipe.name!r}")
    if extra.get("vocab_sha256") != vocab_fingerprint():
        raise UserError(
            f"{path} was trained with another compact vocabulary than {COMPACT_VOCAB_FILE}"
        )
    if DIGEST_KEY not in read_checkpoint_metadata(path):  # nothing would prove what it holds
        raise UserError(f"{path} records no digest of its weights and metadata")
    return load_model(path, device).eval()


def get_pretrained(
    smoke: bool | None = None, progress: bool = True, device: str | None = None
) -> GPTModel:
    """The course's pretrained model, from the cache when present and verified, else trained now and
    cached.

    It is returned on ``choose_device(device)`` (the GPU when there is one and ``device`` is None)
    whether it was read from the cache or trained, and the cache file is the one trained on that
    device type in that precision (:attr:`Recipe.name`). A cached file that fails verification
    (see :func:`load_pretrained`) is trained again, with a warning.
    """
    device = str(choose_device(device))
    recipe = replace(recipe_for(smoke), device=device)
    path = cache_dir() / f"{recipe.name}.safetensors"
    if path.is_file():
        try:
            return load_pretrained(path, recipe, device)
        except UserError as err:
            warnings.warn(
                f"the cached pretrained model cannot be used, training it again: {err}",
                stacklevel=2,
            )
    writable_cache_dir()  # before training: a cache that cannot be written fails in seconds
    model, _ = pretrain(recipe, progress=progress, checkpoint=path)
    return model.to(device).eval()  # train() left it there already; stated here for the contract
