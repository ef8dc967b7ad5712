"""`minigpt.adapters.export_peft`: our LoRA / rsLoRA / PiSSA / DoRA adapters as a PEFT folder that
`peft.PeftModel.from_pretrained` loads on the base written by `minigpt.hf.save_gpt2`, with equal
logits."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from minigpt.adapters import export_peft
from minigpt.dora import LinearWithDoRA, replace_linear_with_dora
from minigpt.hf import save_gpt2
from minigpt.lora import adapter_layers, merge_lora, replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel
from minigpt.pissa import LinearWithPiSSA, pissa_to_lora, replace_linear_with_pissa

hf_logging.set_verbosity_error()
QV = ["query", "value"]


def base_model(seed=0):
    torch.manual_seed(seed)
    model = GPTModel(
        GPTConfig(vocab_size=300, context_length=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    )
    # non-zero biases and LayerNorm parameters, so a swapped tensor cannot hide
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def randomise(model, seed=1):
    """Training-like adapters: random non-zero A and B (PiSSA's moved away from A0/B0), DoRA
    magnitudes off the row norms, so that any mistake in the mapping changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in (layer.lora.A, layer.lora.B):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            if isinstance(layer, LinearWithDoRA):
                layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape, generator=gen))
    return model.eval()


def wrap(method, base, targets):
    model = copy.deepcopy(base)
    if method == "lora":
        replace_linear_with_lora(model, rank=2, alpha=3, target_modules=targets)
    elif method == "rslora":
        replace_linear_with_lora(model, rank=3, alpha=5, target_modules=targets, use_rslora=True)
    elif method == "pissa":
        replace_linear_with_pissa(model, rank=2, alpha=4, target_modules=targets)
    elif method == "dora":
        replace_linear_with_dora(model, rank=2, alpha=3, target_modules=targets)
    # different ranks, scalings and methods inside one fused c_attn, DoRA next to LoRA
    elif method == "mixed":
        replace_linear_with_dora(model, rank=2, alpha=4, target_modules=["query", "fc"])
        replace_linear_with_lora(model, rank=4, alpha=3, target_modules=["value"], use_rslora=True)
    return randomise(model)


def export_and_load(tmp_path, base, model):
    save_gpt2(base, tmp_path / "base")
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    return PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()


def assert_same_logits(ours, peft_model):
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours(x), atol=1e-5, rtol=1e-5)


CASES = [
    (method, targets) for method in ("lora", "rslora", "pissa", "dora") for targets in (None, QV)
]


@pytest.mark.parametrize(
    "method, targets",
    CASES + [("mixed", None)],
    ids=[f"{m}-{'qv' if t else 'all'}" for m, t in CASES] + ["mixed"],
)
def test_peft_loads_export_with_equal_logits(tmp_path, method, targets):
    base = base_model()
    model = wrap(method, base, targets)
    peft_model = export_and_load(tmp_path, base, model)
    assert_same_logits(model, peft_model)
    # every exported tensor landed in a PEFT layer (nothing silently ignored) with its value
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    state = get_peft_model_state_dict(peft_model)  # what PEFT's save_pretrained would write
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)
    # and the adapter does change the model: the base alone gives other logits
    x = torch.randint(0, 300, (1, 32))
    with torch.no_grad(), peft_model.disable_adapter():
        assert not torch.allclose(peft_model(x).logits, model(x), atol=1e-3)


def test_fused_attention_config(tmp_path):
    base = base_model()
    model = wrap("mixed", base, None)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] and config["use_dora"]
    assert not config["use_rslora"] and config["base_model_name_or_path"] is None
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    ranks = {
        "transformer.h.0.attn.c_attn": 6,
        "transformer.h.1.attn.c_attn": 6,
        "transformer.h.0.mlp.c_fc": 2,
        "transformer.h.1.mlp.c_fc": 2,
    }
    # every module's alpha equals its rank: the scaling is folded into B
    for (
        key,
        rank,
    ) in ranks.items():
        assert config["rank_pattern"].get(key, config["r"]) == rank
        assert config["alpha_pattern"].get(key, config["lora_alpha"]) == rank
    saved = load_file(tmp_path / "adapter_model.safetensors")
    # (3C, 2 + 4): q | k | v rows
    B = saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (48, 6) and saved[
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    ].shape == (6, 16)
    assert B[16:32].abs().sum() == 0 and B[:16, 2:].abs().sum() == 0 and B[32:, :2].abs().sum() == 0
    query = model.blocks[0].attn.query
    torch.testing.assert_close(B[:16, :2], query.scaling * query.lora.B.T)
    magnitude = saved["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]
    # DoRA = identity
    torch.testing.assert_close(magnitude[16:32], model.blocks[0].attn.key.weight.norm(dim=1))


def test_single_projection_is_named_in_full(tmp_path):
    base = base_model()
    model = randomise(
        replace_linear_with_lora(
            copy.deepcopy(base), rank=2, alpha=2, target_modules=["blocks.1.mlp.proj"]
        )
    )
    peft_model = export_and_load(tmp_path, base, model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # "c_proj" would also pick attn.c_proj
    assert config["target_modules"] == ["transformer.h.1.mlp.c_proj"]
    assert_same_logits(model, peft_model)


def test_pissa_export_converts_without_changing_the_model(tmp_path):
    base = base_model()
    model = wrap("pissa", base, QV)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_peft(model, tmp_path / "auto")
    assert all(isinstance(layer, LinearWithPiSSA) for _, layer in adapter_layers(model))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert config["r"] == 2 * 2 + 2 * 2  # q and v, each a rank-2r LoRA on the original weight
    # converting first gives the same file
    export_peft(pissa_to_lora(model), tmp_path / "converted")
    auto = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    converted = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert auto.keys() == converted.keys()
    for key in auto:
        torch.testing.assert_close(auto[key], converted[key])


def test_refuses_merged_layers_and_lm_head(tmp_path):
    base = base_model()
    merged = merge_lora(wrap("lora", base, QV))
    with pytest.raises(ValueError, match="unmerge_lora"):
        export_peft(merged, tmp_path)
    head = replace_linear_with_lora(
        copy.deepcopy(base), rank=2, alpha=2, target_modules=["lm_head"], exclude=()
    )
    with pytest.raises(ValueError, match="lm_head"):
        export_peft(head, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers"):
        export_peft(base, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
