"""minigpt.dora: DoRA (arXiv:2402.09353) against PEFT's use_dora=True and by its properties."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from toy_models import TARGETS, Attn, Toy  # noqa: E402,F401  (shared with the other adapter tests)

from minigpt.adapters import load_adapter, save_adapter
from minigpt.dora import LinearWithDoRA, replace_linear_with_dora
from minigpt.lora import (
    adapter_layers,
    adapter_parameters,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)
from minigpt.quant import QuantizedLinear


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def randomise(model, seed=1):
    """Training-like adapters: non-zero B and a magnitude moved away from ||W0||."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.3)
            if isinstance(layer, LinearWithDoRA):
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return model


def dora_pair(use_rslora=False, dropout=0.0, seed=0):
    base = toy(seed)
    ours = randomise(
        replace_linear_with_dora(
            copy.deepcopy(base),
            rank=3,
            alpha=6,
            target_modules=TARGETS,
            dropout=dropout,
            use_rslora=use_rslora,
        )
    )
    twin = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=3,
            lora_alpha=6,
            target_modules=TARGETS,
            use_dora=True,
            lora_dropout=dropout,
            use_rslora=use_rslora,
        ),
    )
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            peft_layer = twin.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora.A.T)
            peft_layer.lora_B["default"].weight.copy_(layer.lora.B.T)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return base, ours, twin


# ----------------------------------------------------------------------------- initialisation


def test_magnitude_is_the_row_norm_and_matches_peft():
    base = toy()
    ours = replace_linear_with_dora(copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS)
    twin = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, use_dora=True)
    )
    for name, layer in adapter_layers(ours):
        assert layer.magnitude.shape == (10,)  # one per output feature
        torch.testing.assert_close(layer.magnitude, base.get_submodule(name).weight.norm(dim=1))
        peft_magnitude = (
            twin.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        )
        torch.testing.assert_close(layer.magnitude, peft_magnitude, rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.data(),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_zero_change_at_init(in_f, out_f, data, bias, detach_norm, seed):
    rank = data.draw(st.integers(1, min(in_f, out_f)))
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    layer = LinearWithDoRA(linear, rank, alpha=2, detach_norm=detach_norm)
    x = torch.randn(4, in_f)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_magnitude_scales_rows_and_not_the_bias():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = LinearWithDoRA(linear, rank=2, alpha=2)
    with torch.no_grad():
        layer.magnitude[1] *= 3.0
    x = torch.randn(5, 6)
    expected = x @ linear.weight.T
    expected[:, 1] *= 3.0
    torch.testing.assert_close(layer(x), expected + linear.bias, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_match_peft_eval_and_train(use_rslora):
    base, ours, twin = dora_pair(use_rslora=use_rslora)
    x = torch.randn(4, 5, 12)
    ours.eval(), twin.eval()
    torch.testing.assert_close(ours(x), twin(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(x), base(x), atol=1e-3)
    ours.train(), twin.train()
    torch.testing.assert_close(ours(x), twin(x), rtol=1e-5, atol=1e-5)


def test_outputs_match_peft_with_dropout_and_the_same_mask():
    _, ours, twin = dora_pair(dropout=0.3)
    ours.train(), twin.train()
    x = torch.randn(4, 5, 12)
    torch.manual_seed(11)
    out = ours(x)
    torch.manual_seed(11)
    torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(12)
    assert not torch.allclose(ours(x), out)  # a different mask does matter


def test_gradients_match_peft():
    _, ours, twin = dora_pair()
    x = torch.randn(4, 12)
    ours(x).square().sum().backward()
    twin(x).square().sum().backward()
    for name, layer in adapter_layers(ours):
        peft_layer = twin.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.lora.A.grad, peft_layer.lora_A["default"].weight.grad.T, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            layer.lora.B.grad, peft_layer.lora_B["default"].weight.grad.T, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            layer.magnitude.grad,
            peft_layer.lora_magnitude_vector["default"].weight.grad,
            rtol=1e-4,
            atol=1e-5,
        )


def test_merged_weights_match_peft_and_unmerge_restores():
    base, ours, twin = dora_pair()
    x = torch.randn(4, 12)
    adapted = ours(x)
    merged_peft = twin.merge_and_unload()
    merge_lora(ours)
    for name, layer in adapter_layers(ours):
        torch.testing.assert_close(
            layer.linear.weight, merged_peft.get_submodule(name).weight, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(ours(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(ours)
    for name, layer in adapter_layers(ours):
        torch.testing.assert_close(
            layer.linear.weight, base.get_submodule(name).weight, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(ours(x), adapted, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients and the
# detached norm


def manual_dora(layer, x, detach):
    """Eq. (5) written directly: W' = m · V / ||V||, V = W0 + ΔW."""
    V = layer.linear.weight + layer.delta_weight()
    norm = V.norm(dim=1, keepdim=True)
    return F.linear(
        x, layer.magnitude[:, None] * V / (norm.detach() if detach else norm), layer.linear.bias
    )


def test_only_A_B_and_magnitude_get_gradients():
    model = randomise(replace_linear_with_dora(toy(), rank=3, alpha=6, target_modules=TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"attn.{t}.{p}" for t in TARGETS for p in ("lora.A", "lora.B", "magnitude")
    }
    model(torch.randn(4, 12)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 10), st.integers(2, 10), st.integers(0, 2**16))
def test_detach_norm_changes_gradients_not_outputs(in_f, out_f, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f)
    layers = {
        d: randomise(
            nn.Sequential(LinearWithDoRA(copy.deepcopy(linear), 2, alpha=4, detach_norm=d)), seed
        )[0]
        for d in (True, False)
    }
    layers[False].load_state_dict(layers[True].state_dict())
    x = torch.randn(6, in_f)
    outputs = {d: layer(x) for d, layer in layers.items()}
    torch.testing.assert_close(outputs[True], outputs[False])
    for d, layer in layers.items():
        outputs[d].square().sum().backward()
        reference = copy.deepcopy(layer)
        manual_dora(reference, x, detach=d).square().sum().backward()
        for p, q in zip(adapter_parameters(layer), adapter_parameters(reference), strict=False):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        layers[True].lora.A.grad, layers[False].lora.A.grad, rtol=1e-3, atol=1e-6
    )


# ----------------------------------------------------------------------------- merge guards,
# mixing, files


def test_zero_norm_row_stays_finite_where_peft_gives_nan(peft_twin):
    """peft#2049: an all-zero weight row has no direction. We floor the norm at
    torch.finfo.tiny (documented in minigpt.dora); PEFT 0.21 divides 0 by 0. Other rows agree with
    PEFT; ours stays finite through the forward, a training step, merge and unmerge."""
    base = toy()
    with torch.no_grad():
        base.attn.query.weight[1] = 0.0
    ours = replace_linear_with_dora(copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS)
    twin = peft_twin(base, ours, r=3, lora_alpha=6, target_modules=TARGETS, use_dora=True)
    x = torch.randn(4, 12)
    with torch.no_grad():
        theirs = twin.base_model.model.attn.query(x)
        mine = ours.attn.query(x)
    assert torch.isnan(theirs[:, 1]).all()
    # the base output: the bias
    torch.testing.assert_close(mine[:, 1], base.attn.query(x)[:, 1].detach())
    keep = [0] + list(range(2, 10))
    torch.testing.assert_close(mine[:, keep], theirs[:, keep])
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
    opt.step()
    assert all(torch.isfinite(p).all() for p in ours.parameters())
    adapted = ours(x)
    merge_lora(ours)
    torch.testing.assert_close(ours(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(ours)
    torch.testing.assert_close(ours(x), adapted, rtol=1e-5, atol=1e-5)


def test_unmerge_refuses_zero_magnitude():
    model = merge_lora(nn.Sequential(LinearWithDoRA(nn.Linear(4, 3), rank=2, alpha=2)))
    with torch.no_grad():
        model[0].magnitude[2] = 0.0
    with pytest.raises(ValueError, match=r"magnitude entries \[2\] are zero"):
        unmerge_lora(model)


def test_merge_lora_dispatches_per_layer_type():
    model = replace_linear_with_lora(toy(), rank=2, alpha=4, target_modules=["query"])
    model = randomise(replace_linear_with_dora(model, rank=2, alpha=4, target_modules=["value"]))
    assert [type(m).__name__ for _, m in adapter_layers(model)] == [
        "LinearWithLoRA",
        "LinearWithDoRA",
    ]
    x = torch.randn(4, 12)
    adapted = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_dora_on_quantized_base():
    torch.manual_seed(0)
    qlinear = QuantizedLinear.from_linear(nn.Linear(64, 32), method="nf4")
    layer = LinearWithDoRA(qlinear, rank=4, alpha=8)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), qlinear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="merge"):
        layer.merge()


def test_save_load_includes_magnitude(tmp_path):
    base = toy()
    trained = randomise(
        replace_linear_with_dora(
            copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS, detach_norm=False
        )
    )
    path = tmp_path / "dora.safetensors"
    save_adapter(trained, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["method"] == "dora"
        assert "attn.query.magnitude" in set(f.keys())
    x = torch.randn(4, 12)
    loaded = load_adapter(copy.deepcopy(base), path)
    assert isinstance(loaded.attn.value, LinearWithDoRA) and loaded.attn.value.detach_norm is False
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in trained.named_parameters() if p.requires_grad
    }
    with pytest.raises(
        ValueError, match="lora adapter of rank 3, but the file holds a dora adapter"
    ):
        load_adapter(
            replace_linear_with_lora(copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS),
            path,
        )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(detach_norm="yes"), TypeError, "detach_norm"),
        (dict(rank=0), ValueError, "rank"),
        (dict(alpha=0), ValueError, "alpha"),
        (dict(dropout=-0.5), ValueError, "dropout"),
        (dict(use_rslora=None), TypeError, "use_rslora"),
        (dict(init="xavier"), ValueError, "init"),
        (dict(target_modules=["attn"]), TypeError, "target_modules"),
    ],
)
def test_replace_with_dora_rejects_bad_arguments(kwargs, exc, match):
    model = toy()
    with pytest.raises(exc, match=match):
        replace_linear_with_dora(model, **(dict(rank=2, alpha=2, target_modules=TARGETS) | kwargs))
    assert adapter_layers(model) == []
