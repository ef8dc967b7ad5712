"""`minigpt.hf.save_gpt2`: our GPT as a Hugging Face GPT-2 folder that `transformers` loads with
equal logits."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from minigpt.hf import load_gpt2, save_gpt2
from minigpt.model import GPTConfig, GPTModel

hf_logging.set_verbosity_error()


def our_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        **{
            "vocab_size": 97,
            "context_length": 24,
            "n_layer": 2,
            "n_head": 4,
            "n_embd": 48,
            "dropout": 0.0,
            **overrides,
        }
    )
    model = GPTModel(cfg).eval()
    # non-zero biases and LayerNorm parameters, so a swapped tensor cannot hide
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def assert_same_logits(ours, other, vocab_size, context=24):
    x = torch.randint(0, vocab_size, (2, context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = other(x)
        torch.testing.assert_close(getattr(theirs, "logits", theirs), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_transformers_loads_saved_model_with_equal_logits(tmp_path, tie, bias):
    ours = our_model(tie_weights=tie, bias=bias)
    save_gpt2(ours, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(ours, hf, 97)
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tie


def test_round_trip_through_load_gpt2(tmp_path):
    ours = our_model(tie_weights=False)
    save_gpt2(ours, tmp_path)
    back = load_gpt2(tmp_path)
    assert back.cfg.vocab_size == 97 and back.cfg.n_layer == 2 and not back.cfg.tie_weights
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert_same_logits(ours, back, 97)


def test_round_trip_from_transformers_and_back(tmp_path):
    torch.manual_seed(3)
    cfg = GPT2Config(
        vocab_size=97,
        n_positions=24,
        n_embd=48,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    original = GPT2LMHeadModel(cfg).eval()
    original.save_pretrained(tmp_path / "hf")
    save_gpt2(load_gpt2(tmp_path / "hf"), tmp_path / "again", eos_token_id=0)
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)


def test_compact_vocabulary_model_keeps_its_own_ids(tmp_path):
    from minigpt.tokenizer import get_compact_vocab

    vocab = get_compact_vocab()
    ours = our_model(vocab_size=len(vocab), context_length=32)
    save_gpt2(ours, tmp_path, eos_token_id=vocab.eot_id)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == ours.cfg.vocab_size and config["eos_token_id"] == vocab.eot_id
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([vocab.encode("ROMEO:\nWhat light through yonder window breaks?")[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        generated = hf.generate(
            ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=vocab.eot_id
        )
    assert vocab.decode(generated[0].tolist()).startswith(vocab.decode(ids[0, :4].tolist()))


def test_full_gpt2_vocabulary_gets_endoftext_as_eos(tmp_path):
    save_gpt2(our_model(vocab_size=50257, n_layer=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 50256


def test_refuses_models_with_adapters(tmp_path):
    from minigpt.lora import replace_linear_with_lora

    model = our_model()
    replace_linear_with_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="merge the adapters"):
        save_gpt2(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
