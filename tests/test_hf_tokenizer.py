"""Exported models generate in `transformers`: `CompactTokenizer` encodes and decodes exactly as the
compact vocabulary does, `save_gpt2` writes it next to the model, and pipelines run on the folder
(a PEFT adapter on top included); a full-vocabulary GPT-2 gets GPT-2's own tokenizer files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

from minigpt.hf import CompactTokenizer, save_gpt2
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import END_OF_TEXT, get_compact_vocab, get_tokenizer

hf_logging.set_verbosity_error()
README = Path(__file__).resolve().parent.parent / "README.md"
TEXTS = [
    "ROMEO:\nWhat light through yonder window breaks?",
    "  two  spaces, tabs\tand\n\nblank lines  ",
    "héllo wörld 😀 — “quotes” ünïcödé",
    "def f(x):\n    return x ** 2<|endoftext|>JULIET:\nAy me!",
    "<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return CompactTokenizer()


def tiny_model(vocab_size: int | None = None, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("micro")
    if vocab_size is not None:
        cfg = GPTConfig.from_preset("micro", vocab_size=vocab_size)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_the_compact_vocabulary(tokenizer, text):
    vocab = get_compact_vocab()
    ids = tokenizer(text).input_ids
    assert ids == vocab.encode(text)
    assert tokenizer.decode(ids) == vocab.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text


_TOKENIZER: list = []


def _shared_tokenizer() -> CompactTokenizer:
    if not _TOKENIZER:
        _TOKENIZER.append(CompactTokenizer())
    return _TOKENIZER[0]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips_like_minigpt(text):
    tokenizer, vocab = _shared_tokenizer(), get_compact_vocab()
    ids = tokenizer(text).input_ids
    assert ids == vocab.encode(text) and tokenizer.decode(ids) == text


def test_special_token_ids_are_in_range(tokenizer):
    vocab = get_compact_vocab()
    assert len(tokenizer) == tokenizer.vocab_size == len(vocab)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == vocab.eot_id < len(vocab)
    assert tokenizer.decode([vocab.eot_id, 300], skip_special_tokens=True) == vocab.decode([300])


def test_save_gpt2_writes_the_tokenizer_and_in_range_ids(tmp_path):
    vocab = get_compact_vocab()
    save_gpt2(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == vocab.eot_id < config["vocab_size"], key
    loaded = CompactTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXTS[3]).input_ids == vocab.encode(TEXTS[3])
    loaded.save_pretrained(tmp_path / "again")
    again = CompactTokenizer.from_pretrained(tmp_path / "again")
    assert again.decode(again(TEXTS[2]).input_ids) == TEXTS[2]


def test_an_out_of_range_eos_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        save_gpt2(tiny_model(vocab_size=97), tmp_path, eos_token_id=50256)
    assert not (tmp_path / "model.safetensors").exists()


def test_pipeline_generates_from_an_exported_tiny_model(tmp_path):
    save_gpt2(tiny_model(), tmp_path)
    tokenizer = CompactTokenizer.from_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=tokenizer)
    out = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("ROMEO:") and len(tokenizer(out).input_ids) > len(
        tokenizer("ROMEO:").input_ids
    )


def test_pipeline_generates_with_a_peft_adapter_on_top(tmp_path):
    import peft

    from minigpt.adapters import export_peft
    from minigpt.lora import replace_linear_with_lora

    base = tiny_model()
    save_gpt2(base, tmp_path / "base")
    model = replace_linear_with_lora(base, rank=2, alpha=4)
    with torch.no_grad():  # a non-zero adapter, so the two generations can differ
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.5)
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    tokenizer = CompactTokenizer.from_pretrained(tmp_path / "base")
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModelForCausalLM.from_pretrained(hf_base, tmp_path / "adapter").eval()
    generator = pipeline("text-generation", model=hf, tokenizer=tokenizer)
    out = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("ROMEO:")
    ids = torch.tensor([tokenizer("ROMEO:").input_ids])
    with torch.no_grad():  # the pipeline's model is ours, adapter included
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_full_vocabulary_gpt2_gets_gpt2s_own_tokenizer(tmp_path):
    save_gpt2(tiny_model(vocab_size=50257), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXTS[3]
    assert tokenizer(text).input_ids == get_tokenizer().encode(text, allowed_special="all")
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == config["pad_token_id"] == 50256


def test_other_vocabulary_sizes_get_no_tokenizer(tmp_path):
    save_gpt2(tiny_model(vocab_size=97), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert "eos_token_id" not in json.loads((tmp_path / "config.json").read_text())


def test_base_import_does_not_load_transformers():
    code = (
        "import sys, minigpt.hf, minigpt.lora, minigpt.adapters\n"
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def readme_snippets() -> list[str]:
    """The README's Python code blocks, in order, unindented."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


def test_readme_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    snippets = readme_snippets()
    assert len(snippets) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:  # later snippets continue earlier ones, as the README says
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(line.startswith("ROMEO:") for line in printed)
