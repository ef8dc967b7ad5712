"""minigpt.lora: LoRA (arXiv:2106.09685) and rsLoRA (arXiv:2312.03732) against PEFT and by their
properties.

Fixtures (tests/conftest.py): ``toy`` builds the small model, ``randomise`` gives adapters
training-like values, ``peft_twin`` builds PEFT's model holding the same numbers, so outputs, merges
and files can be compared."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt.adapters import adapter_size_bytes, load_adapter, save_adapter
from minigpt.lora import (
    LinearWithLoRA,
    LoRALayer,
    adapter_layers,
    count_parameters,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    replace_linear_with_lora,
    trainable_summary,
    unmerge_lora,
)
from minigpt.model import GPTConfig, GPTModel
from minigpt.quant import QuantizedLinear

TARGETS = ["query", "value"]


# ----------------------------------------------------------------------------- LoRALayer


def test_lora_layer_shapes_scaling_and_zero_output():
    layer = LoRALayer(12, 5, rank=4, alpha=8)
    assert layer.A.shape == (12, 4) and layer.B.shape == (4, 5)
    assert layer.scaling == 2.0
    assert LoRALayer(12, 5, rank=4, alpha=8, use_rslora=True).scaling == 4.0  # alpha / sqrt(rank)
    assert torch.count_nonzero(layer.B) == 0
    torch.testing.assert_close(layer(torch.randn(3, 12)), torch.zeros(3, 5))
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), 2.0 * x @ layer.A @ layer.B)


def test_kaiming_init_bound_uses_in_dim_not_rank():
    torch.manual_seed(0)
    layer = LoRALayer(400, 3, rank=50, alpha=1)
    # PEFT: kaiming_uniform_(a=sqrt(5)) on nn.Linear(in_dim, rank).weight
    bound = 1 / math.sqrt(400)
    assert layer.A.abs().max() <= bound
    assert layer.A.abs().max() > 0.95 * bound
    peft_like = nn.Linear(400, 50, bias=False)
    assert abs(peft_like.weight.std().item() - layer.A.std().item()) < 0.1 * layer.A.std().item()


def test_gaussian_init_std_is_one_over_rank():
    torch.manual_seed(0)
    layer = LoRALayer(500, 3, rank=40, alpha=1, init="gaussian")
    assert abs(layer.A.std().item() - 1 / 40) < 0.05 / 40
    assert torch.count_nonzero(layer.B) == 0


# ----------------------------------------------------------------------------- LinearWithLoRA


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data(), st.booleans(), st.booleans())
def test_zero_change_at_init(in_f, out_f, data, bias, rslora):
    rank = data.draw(st.integers(1, min(in_f, out_f)))
    linear = nn.Linear(in_f, out_f, bias=bias)
    layer = LinearWithLoRA(linear, rank, alpha=2 * rank, use_rslora=rslora)
    x = torch.randn(4, in_f)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


def test_linear_with_lora_attributes_and_forward():
    linear = nn.Linear(6, 4)
    layer = LinearWithLoRA(linear, rank=2, alpha=3)
    assert layer.linear is linear and isinstance(layer.lora, LoRALayer)
    assert layer.scaling == 1.5 and layer.merged is False and layer.lora.rank == 2
    with torch.no_grad():
        layer.lora.B.normal_()
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), linear(x) + 1.5 * x @ layer.lora.A @ layer.lora.B)


def test_dropout_only_on_adapter_branch():
    linear = nn.Linear(6, 4)
    layer = LinearWithLoRA(linear, rank=2, alpha=2, dropout=0.5).train()
    x = torch.randn(50, 6)
    torch.testing.assert_close(layer(x), linear(x))  # B = 0: dropout must not touch the base path
    with torch.no_grad():
        layer.lora.B.normal_()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    expected = linear(x) + layer.lora(nn.functional.dropout(x, 0.5, training=True))
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x) + layer.lora(x))


def test_lora_on_quantized_base_forward_but_no_merge(randomise):
    torch.manual_seed(0)
    qlinear = QuantizedLinear.from_linear(nn.Linear(64, 32), method="int8")
    layer = randomise(LinearWithLoRA(qlinear, rank=4, alpha=8))
    model = nn.Sequential(layer)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), qlinear(x) + layer.lora(x))
    with pytest.raises(TypeError, match="merge"):
        merge_lora(model)


def test_rank_above_min_features_is_allowed_and_exact(randomise):
    linear = nn.Linear(3, 5)
    layer = randomise(nn.Sequential(LinearWithLoRA(linear, rank=8, alpha=8)))[0]
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), linear(x) + x @ layer.lora.A @ layer.lora.B)


def test_numpy_scalars_are_numbers(toy, tmp_path):
    model = replace_linear_with_lora(
        toy(),
        rank=np.int64(2),
        alpha=np.float32(4.0),
        dropout=np.float64(0.0),
        use_rslora=np.bool_(False),
        target_modules=TARGETS,
    )
    assert model.attn.query.scaling == 2.0 and type(model.attn.query.lora.rank) is int
    save_adapter(model, tmp_path / "a.safetensors")
    assert load_adapter(toy(), tmp_path / "a.safetensors").attn.value.lora.rank == 2


def test_nested_wrappers_are_refused():
    with pytest.raises(TypeError, match="already has an adapter"):
        LinearWithLoRA(LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=2), rank=2, alpha=2)


# ----------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_merge_match_peft(toy, randomise, peft_twin, use_rslora):
    base = toy()
    ours = randomise(
        replace_linear_with_lora(
            copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS, use_rslora=use_rslora
        )
    )
    twin = peft_twin(base, ours, r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=use_rslora)
    for name, layer in adapter_layers(ours):
        assert layer.scaling == twin.base_model.model.get_submodule(name).scaling["default"]
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), twin(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours(x), base(x), atol=1e-3)  # the adapters do something

    merged_peft = twin.merge_and_unload()
    merge_lora(ours)
    for name in ("attn.query", "attn.value"):
        torch.testing.assert_close(
            ours.get_submodule(name).linear.weight,
            merged_peft.get_submodule(name).weight,
            rtol=1e-6,
            atol=1e-6,
        )
    torch.testing.assert_close(ours(x), merged_peft(x), rtol=1e-5, atol=1e-5)


def test_dropout_in_train_mode_matches_peft_with_same_seed(toy, randomise, peft_twin):
    base = toy()
    ours = randomise(
        replace_linear_with_lora(
            copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS, dropout=0.3
        )
    ).train()
    twin = peft_twin(
        base, ours, r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.3
    ).train()
    x = torch.randn(3, 5, 8)
    torch.manual_seed(7)
    out = ours(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, twin(x), rtol=1e-6, atol=1e-6)


def test_all_linear_matches_peft_selection(toy):
    # PEFT's "all-linear" skips the output layer only for transformers models (found via
    # get_output_embeddings); on a plain module we compare after naming it in PEFT's
    # exclude_modules.
    ours = replace_linear_with_lora(toy(), rank=2, alpha=4)
    twin = get_peft_model(
        toy(),
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["lm_head"]),
    )
    peft_wrapped = {
        n.removeprefix("base_model.model.") for n, m in twin.named_modules() if hasattr(m, "lora_A")
    }
    assert (
        {n for n, _ in adapter_layers(ours)}
        == peft_wrapped
        == {"attn.query", "attn.value", "mlp.fc"}
    )


# -----------------------------------------------------------------------------
# replace_linear_with_lora


def test_replace_targets_suffix_rule_and_exclude(toy):
    model = toy()
    model.attn.myquery = nn.Linear(8, 8)  # ends with "query" but not with ".query": must not match
    replace_linear_with_lora(model, rank=2, alpha=4, target_modules="query")
    assert [n for n, _ in adapter_layers(model)] == ["attn.query"]
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, exclude=("lm_head", "fc"))
    assert [n for n, _ in adapter_layers(model)] == ["attn.query", "attn.value"]
    model = replace_linear_with_lora(
        toy(), rank=2, alpha=4, target_modules=["attn.value", "lm_head"]
    )
    assert [n for n, _ in adapter_layers(model)] == ["attn.value", "lm_head"]


def test_freeze_leaves_only_A_and_B_trainable_and_only_they_get_gradients(toy, randomise):
    model = randomise(replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"attn.{t}.lora.{m}" for t in TARGETS for m in "AB"}
    model(torch.randn(2, 3, 8)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name
    unfrozen = replace_linear_with_lora(
        toy(), rank=2, alpha=4, target_modules=TARGETS, freeze=False
    )
    assert unfrozen.lm_head.weight.requires_grad and unfrozen.attn.query.lora.A.requires_grad


def test_count_parameters_and_summary(toy):
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS)
    trainable, total = count_parameters(model)
    assert trainable == 2 * (8 * 2 + 2 * 8)
    assert total == sum(p.numel() for p in toy().parameters()) + trainable
    assert (
        trainable_summary(model)
        == f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f} %)"
    )
    mark_only_lora_as_trainable(model)
    assert count_parameters(model)[0] == trainable


def test_course_gpt_all_linear_keeps_output_and_skips_tied_head():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro"))
    idx = torch.randint(0, 4096, (2, 7))
    before = model(idx)
    replace_linear_with_lora(model, rank=4, alpha=8)
    names = [n for n, _ in adapter_layers(model)]
    assert len(names) == 6 * 2 and "lm_head" not in names and "blocks.0.attn.query" in names
    torch.testing.assert_close(model(idx), before)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        # the one message test: it lists the model's linear layers
        (
            dict(target_modules=["qurey"]),
            ValueError,
        ),
        (dict(target_modules=["attn"]), TypeError),
        (dict(target_modules=[]), TypeError),
        (dict(exclude=("query", "value", "fc", "lm_head")), ValueError),
        (dict(rank=0), ValueError),
        (dict(rank=2.5), ValueError),
        (dict(alpha=float("nan")), ValueError),
        (dict(dropout=1.0), ValueError),
        (dict(use_rslora="yes"), TypeError),
        (dict(init="normal"), ValueError),
        (dict(freeze=None), TypeError),
    ],
)
def test_replace_rejects_bad_arguments_without_touching_the_model(toy, kwargs, exc):
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc) as err:
        replace_linear_with_lora(model, **(dict(rank=2, alpha=4) | kwargs))
    assert adapter_layers(model) == [] and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )
    if "qurey" in str(kwargs):
        assert "attn.query" in str(err.value)


def test_rank_above_a_layers_size_warns_and_works(toy):
    with pytest.warns(UserWarning, match="rank 9 exceeds min"):
        model = replace_linear_with_lora(toy(), rank=9, alpha=9, target_modules=["query"])
    assert model.attn.query.lora.A.shape == (8, 9)


def test_replace_refuses_already_wrapped_layers(toy):
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=["query"])
    with pytest.raises(ValueError, match="already has a lora adapter"):
        replace_linear_with_lora(model, rank=2, alpha=4, target_modules=["query"])
    with pytest.raises(ValueError, match="already has"):
        replace_linear_with_lora(model, rank=2, alpha=4)


def test_tied_weight_warning(toy):
    model = toy()
    model.extra = nn.Linear(16, 11, bias=False)
    model.extra.weight = model.lm_head.weight
    with pytest.warns(UserWarning, match="tied"):
        replace_linear_with_lora(model, rank=2, alpha=4, target_modules=["lm_head"])


# ----------------------------------------------------------------------------- merge / unmerge


@settings(max_examples=15, deadline=None)
@given(
    st.integers(2, 10), st.integers(2, 10), st.integers(1, 2), st.booleans(), st.integers(0, 2**16)
)
def test_merge_unmerge_round_trip(randomise, in_f, out_f, rank, rslora, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Tanh(), nn.Linear(out_f, in_f))
    original = [m.weight.detach().clone() for m in (model[0], model[2])]
    randomise(
        replace_linear_with_lora(model, rank=rank, alpha=3, use_rslora=rslora, exclude=()), seed
    )
    x = torch.randn(4, in_f)
    adapted = model(x)
    merge_lora(model)
    assert all(layer.merged for _, layer in adapter_layers(model))
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].linear.weight, original[0] + model[0].delta_weight())
    unmerge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    for layer, weight in zip((model[0], model[2]), original, strict=False):
        torch.testing.assert_close(layer.linear.weight, weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge_first", [False, True])
def test_merge_and_unload_leaves_the_base_modules(merge_first):
    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=40, context_length=8, n_layer=2, n_head=2, n_embd=16))
    model = replace_linear_with_lora(copy.deepcopy(base), rank=2, alpha=4)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora.B.normal_()
    tokens = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        expected = model(tokens)
    if merge_first:
        merge_lora(model)
    unloaded = merge_and_unload(model)
    assert not adapter_layers(unloaded)
    # the base's own modules
    assert [type(m) for m in unloaded.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        torch.testing.assert_close(unloaded(tokens), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(unloaded(tokens), base(tokens))
    with pytest.raises(ValueError, match="no adapter layers"):
        merge_and_unload(unloaded)


def test_double_merge_and_unmerge_are_refused(toy, randomise):
    model = randomise(replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    weight = model.attn.query.linear.weight.detach().clone()
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    torch.testing.assert_close(model.attn.query.linear.weight, weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter layers"):
        merge_lora(toy())
    partly = randomise(replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS))
    partly.attn.value.merge()
    with pytest.raises(ValueError, match=r"already merged in \['attn.value'\]"):
        merge_lora(partly)
    assert not partly.attn.query.merged  # checked before anything was merged
    partly.attn.query.merge()
    partly.attn.value.unmerge()
    with pytest.raises(ValueError, match=r"not merged in \['attn.value'\]"):
        unmerge_lora(partly)
    assert partly.attn.query.merged


# ----------------------------------------------------------------------------- adapter files


def test_save_load_round_trip_onto_plain_and_wrapped_models(toy, randomise, tmp_path):
    base = toy()
    trained = randomise(
        replace_linear_with_lora(
            copy.deepcopy(base),
            rank=3,
            alpha=6,
            target_modules=TARGETS,
            use_rslora=True,
            dropout=0.1,
        )
    ).eval()
    path = tmp_path / "adapter.safetensors"
    save_adapter(trained, path)
    # no temp file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == {f"attn.{t}.lora.{m}" for t in TARGETS for m in "AB"}
    assert meta["method"] == "lora" and meta["rank"] == "3" and meta["alpha"] == "6.0"
    assert meta["use_rslora"] == "True" and json.loads(meta["targets"]) == [
        "attn.query",
        "attn.value",
    ]

    x = torch.randn(2, 4, 8)
    plain = load_adapter(copy.deepcopy(base), path).eval()  # wrappers rebuilt from the metadata
    torch.testing.assert_close(plain(x), trained(x), rtol=0, atol=0)
    assert (
        plain.attn.query.scaling == trained.attn.query.scaling and plain.attn.query.dropout.p == 0.1
    )
    assert count_parameters(plain) == count_parameters(trained)
    fresh = replace_linear_with_lora(
        copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS, use_rslora=True
    )
    torch.testing.assert_close(load_adapter(fresh, path).eval()(x), trained(x), rtol=0, atol=0)


def test_adapter_size_bytes(toy):
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS)
    adapter, full = adapter_size_bytes(model)
    assert adapter == 4 * 2 * (8 * 2 + 2 * 8)
    assert full == 4 * sum(t.numel() for t in model.state_dict().values())


def test_load_adapter_errors(toy, randomise, tmp_path):
    trained = randomise(replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS))
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    with pytest.raises(ValueError, match="rank 3.*rank 2"):
        load_adapter(replace_linear_with_lora(toy(), rank=3, alpha=4, target_modules=TARGETS), path)
    with pytest.raises(ValueError, match="'attn.query' is not a linear layer"):
        load_adapter(nn.Sequential(nn.Linear(8, 8)), path)
    with pytest.raises(
        ValueError, match=r"'attn.query.lora.A' has shape \(8, 2\).*expects \(16, 2\)"
    ):
        load_adapter(toy(d=16), path)
    merged = merge_lora(copy.deepcopy(trained))
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(merged, path)
    with pytest.raises(FileNotFoundError):
        load_adapter(toy(), tmp_path / "missing.safetensors")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors adapter file"):
        load_adapter(toy(), corrupt)

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file(tensors | {"attn.value.lora.B": torch.zeros(2, 5)}, str(bad_shape), metadata=meta)
    model = toy()
    with pytest.raises(
        ValueError, match=r"'attn.value.lora.B' has shape \(2, 5\).*expects \(2, 8\)"
    ):
        load_adapter(model, bad_shape)
    assert adapter_layers(model) == []  # nothing changed before the error
    missing = tmp_path / "missing_key.safetensors"
    save_file(
        {k: v for k, v in tensors.items() if k != "attn.query.lora.B"}, str(missing), metadata=meta
    )
    with pytest.raises(ValueError, match="lacks tensor 'attn.query.lora.B'"):
        load_adapter(toy(), missing)
    extra = tmp_path / "extra.safetensors"
    save_file(tensors | {"mlp.fc.lora.A": torch.zeros(8, 2)}, str(extra), metadata=meta)
    with pytest.raises(ValueError, match="no layer expects.*mlp.fc.lora.A"):
        load_adapter(toy(), extra)
    no_meta = tmp_path / "no_meta.safetensors"
    save_file(tensors, str(no_meta))
    with pytest.raises(ValueError, match="format"):
        load_adapter(toy(), no_meta)
    bad_method = tmp_path / "bad_method.safetensors"
    layers = {k: v | {"method": "ia3"} for k, v in json.loads(meta["layers"]).items()}
    save_file(tensors, str(bad_method), metadata=meta | {"layers": json.dumps(layers)})
    with pytest.raises(ValueError, match="adapter method must be one of"):
        load_adapter(toy(), bad_method)


def test_save_adapter_failure_leaves_no_temp_file(toy, tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.write_bytes

    def failing_write(self, data):  # the write of the file's bytes fails half-way
        real(self, b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(toy(), tmp_path / "b.safetensors")


def test_load_refuses_non_finite_tensors_naming_them(toy, randomise, tmp_path):
    trained = randomise(replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=TARGETS))
    with torch.no_grad():
        trained.attn.value.lora.B[0, 1] = float("nan")
    save_adapter(trained, tmp_path / "nan.safetensors")
    model = toy()
    with pytest.raises(ValueError, match="'attn.value.lora.B'.*NaN or inf"):
        load_adapter(model, tmp_path / "nan.safetensors")
    assert adapter_layers(model) == []


def test_replace_on_an_already_wrapped_model_is_refused_and_changes_nothing(toy):
    model = replace_linear_with_lora(toy(), rank=2, alpha=4)
    layers = [layer for _, layer in adapter_layers(model)]
    with pytest.raises(ValueError, match="already has a lora adapter"):
        replace_linear_with_lora(model, rank=2, alpha=4)
    assert [layer for _, layer in adapter_layers(model)] == layers
