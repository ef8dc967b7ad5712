"""minigpt.pissa: PiSSA (arXiv:2404.02948) against PEFT's init_lora_weights="pissa" and by its
properties."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from toy_models import TARGETS, Attn, Toy  # noqa: E402,F401  (shared with the other adapter tests)

from minigpt.adapters import load_adapter, save_adapter
from minigpt.lora import (
    LinearWithLoRA,
    adapter_layers,
    count_parameters,
    merge_lora,
    replace_linear_with_lora,
    unmerge_lora,
)
from minigpt.pissa import (
    LinearWithPiSSA,
    pissa_init,
    pissa_to_lora,
    pissa_to_lora_weights,
    replace_linear_with_pissa,
)
from minigpt.quant import QuantizedLinear


def toy(seed=0, gapped=False):
    """With ``gapped``, the weights have 4 large and 6 tiny singular values, so a randomised SVD
    with 4 power iterations finds the top-4 subspace to float precision whatever its random
    start."""
    torch.manual_seed(seed)
    model = Toy()
    if gapped:
        with torch.no_grad():
            for layer in (model.attn.query, model.attn.value):
                U, _ = torch.linalg.qr(torch.randn(10, 10))
                V, _ = torch.linalg.qr(torch.randn(12, 10))
                S = torch.tensor([3.0, 2.5, 2.0, 1.5] + [0.01 * i for i in range(6, 0, -1)])
                layer.weight.copy_(U @ torch.diag(S) @ V.T)
    return model


def train_a_little(model, steps=5, seed=0):
    """A few SGD steps on a random regression target, so that A, B move away from A0, B0."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 7, generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------- pissa_init


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.5])
def test_pissa_init_is_the_truncated_svd(scaling):
    torch.manual_seed(0)
    W = torch.randn(10, 14)
    A, B, residual = pissa_init(W, rank=3, scaling=scaling)
    assert A.shape == (14, 3) and B.shape == (3, 10) and residual.shape == W.shape
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(scaling * (A @ B).T, top, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(residual + scaling * (A @ B).T, W, rtol=1e-6, atol=1e-6)
    # the residual holds the other singular values (Eckart-Young): its spectrum is S[3:]
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:7], S[3:], rtol=1e-4, atol=1e-5)
    # the split is balanced: A and B carry sqrt(S / scaling) each
    torch.testing.assert_close(A.norm(dim=0), torch.sqrt(S[:3] / scaling), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.norm(dim=1), torch.sqrt(S[:3] / scaling), rtol=1e-5, atol=1e-6)


def test_pissa_init_randomised_svd_is_seeded_and_close():
    W = toy(gapped=True).attn.query.weight.detach()
    torch.manual_seed(5)
    A1, B1, _ = pissa_init(W, rank=4, scaling=2.0, niter=4)
    torch.manual_seed(5)
    A2, B2, _ = pissa_init(W, rank=4, scaling=2.0, niter=4)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    A, B, _ = pissa_init(W, rank=4, scaling=2.0)
    torch.testing.assert_close(A1 @ B1, A @ B, rtol=1e-5, atol=1e-5)


def test_pissa_init_low_precision_weight_svd_in_float32():
    torch.manual_seed(0)
    W = torch.randn(8, 6).to(torch.bfloat16)
    A, B, residual = pissa_init(W, rank=2, scaling=1.0)
    assert A.dtype == B.dtype == torch.float32 and residual.dtype == torch.bfloat16
    torch.testing.assert_close(residual.float() + (A @ B).T, W.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rank", [0, 5])  # the SVD of a (4, 6) weight has 4 directions
def test_pissa_init_rejects_a_rank_the_svd_cannot_give(rank):
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        pissa_init(torch.randn(4, 6), rank)


# ----------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init, niter", [("pissa", None), ("pissa_niter_4", 4)])
def test_matches_peft_pissa(init, niter, use_rslora):
    base = toy(gapped=niter is not None)
    torch.manual_seed(1)
    twin = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora
        ),
    )
    torch.manual_seed(1)
    ours = replace_linear_with_pissa(
        copy.deepcopy(base),
        rank=4,
        alpha=8,
        target_modules=TARGETS,
        niter=niter,
        use_rslora=use_rslora,
    )
    for name, layer in adapter_layers(ours):
        peft_layer = twin.base_model.model.get_submodule(name)
        assert layer.scaling == peft_layer.scaling["default"]
        # products, not A and B: singular vectors' signs are arbitrary
        peft_delta = (
            peft_layer.scaling["default"]
            * peft_layer.lora_B["default"].weight
            @ peft_layer.lora_A["default"].weight
        )
        torch.testing.assert_close(layer.delta_weight(), peft_delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            layer.linear.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-5
        )
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin(x), base(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.data(),
    st.sampled_from([None, 2]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_zero_change_at_init(in_f, out_f, data, niter, rslora, seed):
    rank = data.draw(st.integers(1, min(in_f, out_f)))
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f)
    original = copy.deepcopy(linear)
    layer = LinearWithPiSSA(linear, rank, alpha=3, niter=niter, use_rslora=rslora)
    x = torch.randn(4, in_f)
    torch.testing.assert_close(layer(x), original(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        layer.linear.weight + layer.delta_weight(), original.weight, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(layer.A0, layer.lora.A, rtol=0, atol=0)


def test_base_alone_is_the_residual_not_the_original():
    base = toy()
    model = replace_linear_with_pissa(
        copy.deepcopy(base), rank=4, alpha=4, target_modules=["query"]
    )
    x = torch.randn(3, 12)
    assert not torch.allclose(model.attn.query.linear(x), base.attn.query(x), atol=1e-2)


def test_only_adapters_get_gradients_and_buffers_are_not_parameters():
    model = replace_linear_with_pissa(toy(), rank=3, alpha=6, target_modules=TARGETS)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"attn.{t}.lora.{m}" for t in TARGETS for m in "AB"
    }
    assert {n for n, _ in model.named_buffers()} == {
        f"attn.{t}.{b}" for t in TARGETS for b in ("A0", "B0")
    }
    model(torch.randn(4, 12)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert count_parameters(model)[0] == 2 * 3 * (12 + 10)


def test_merge_unmerge_round_trip():
    base = toy()
    model = train_a_little(
        replace_linear_with_pissa(copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS)
    )
    x = torch.randn(4, 12)
    adapted = model(x)
    residual = model.attn.query.linear.weight.detach().clone()
    merge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.attn.query.linear.weight, residual, rtol=1e-5, atol=1e-6)


def test_tied_weight_is_untied_not_changed():
    model = toy()
    model.emb = nn.Embedding(7, 10)
    model.emb.weight = model.lm_head.weight
    original = model.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied"):
        replace_linear_with_pissa(model, rank=2, alpha=2, target_modules=["lm_head"])
    torch.testing.assert_close(model.emb.weight, original, rtol=0, atol=0)


def test_low_precision_base():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10).to(torch.bfloat16)
    original = copy.deepcopy(linear)
    layer = LinearWithPiSSA(linear, rank=3, alpha=3)
    assert layer.linear.weight.dtype == torch.bfloat16 and layer.lora.A.dtype == torch.float32
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, original(x), rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------- conversion to LoRA


def test_pissa_to_lora_weights_layout():
    A, B, A0, B0 = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6, 2), torch.randn(2, 5)
    A2, B2 = pissa_to_lora_weights(A, B, A0, B0)
    assert A2.shape == (6, 4) and B2.shape == (4, 5)
    torch.testing.assert_close(A2 @ B2, A @ B - A0 @ B0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_to_lora_reproduces_the_trained_model_on_original_weights(tmp_path, use_rslora):
    base = toy()
    trained = train_a_little(
        replace_linear_with_pissa(
            copy.deepcopy(base), rank=3, alpha=6, target_modules=TARGETS, use_rslora=use_rslora
        )
    )
    assert not torch.allclose(trained.attn.query.lora.A, trained.attn.query.A0)  # training moved A
    x = torch.randn(5, 12)
    expected = trained(x)
    converted = pissa_to_lora(copy.deepcopy(trained))
    for name, layer in adapter_layers(converted):
        assert type(layer) is LinearWithLoRA and layer.lora.rank == 6
        assert layer.scaling == pytest.approx(trained.get_submodule(name).scaling, rel=1e-12)
        torch.testing.assert_close(
            layer.linear.weight, base.get_submodule(name).weight, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    # the converted adapter file works on the untouched pretrained model
    path = tmp_path / "as_lora.safetensors"
    save_adapter(converted, path)
    on_original = load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(on_original(x), expected, rtol=1e-5, atol=1e-5)


def test_pissa_to_lora_errors():
    with pytest.raises(ValueError, match="no LinearWithPiSSA"):
        pissa_to_lora(replace_linear_with_lora(toy(), rank=2, alpha=2, target_modules=TARGETS))
    model = merge_lora(replace_linear_with_pissa(toy(), rank=2, alpha=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="unmerge"):
        pissa_to_lora(model)


# ----------------------------------------------------------------------------- adapter files and
# errors


def test_save_load_pissa_adapter(tmp_path):
    base = toy(gapped=True)
    torch.manual_seed(0)
    trained = train_a_little(
        replace_linear_with_pissa(
            copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS, niter=2
        )
    )
    path = tmp_path / "pissa.safetensors"
    save_adapter(trained, path)
    x = torch.randn(5, 12)
    # onto the original model: the wrappers are rebuilt and the residual follows the file's A0, B0
    torch.testing.assert_close(
        load_adapter(copy.deepcopy(base), path)(x), trained(x), rtol=1e-5, atol=1e-5
    )
    # onto a model PiSSA-initialised with another random start
    torch.manual_seed(123)
    other = replace_linear_with_pissa(
        copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS, niter=1
    )
    torch.testing.assert_close(load_adapter(other, path)(x), trained(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank=11), ValueError, "at most min"),
        (dict(alpha=0), ValueError, "alpha"),
        (dict(niter=-2), ValueError, "niter"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(target_modules=["key"]), ValueError, "target_modules"),
    ],
)
def test_replace_with_pissa_rejects_bad_arguments_before_changing_anything(kwargs, exc, match):
    model = toy()
    weight = model.attn.query.weight.detach().clone()
    with pytest.raises(exc, match=match):
        replace_linear_with_pissa(model, **(dict(rank=2, alpha=2, target_modules=TARGETS) | kwargs))
    assert adapter_layers(model) == []
    torch.testing.assert_close(model.attn.query.weight, weight, rtol=0, atol=0)


def test_pissa_needs_a_real_weight():
    model = nn.Sequential(QuantizedLinear.from_linear(nn.Linear(64, 32), method="int8"))
    with pytest.raises(TypeError, match="PiSSA initialisation of '0' needs"):
        replace_linear_with_pissa(model, rank=2, alpha=2)
    assert adapter_layers(model) == []


def test_converted_adapter_with_2r_above_min_features_saves_and_loads(tmp_path):
    """Rank 2r = 12 > min(12, 10) must round-trip through an adapter file on the original
    model."""
    base = toy()
    trained = train_a_little(
        replace_linear_with_pissa(copy.deepcopy(base), rank=6, alpha=6, target_modules=TARGETS)
    )
    x = torch.randn(5, 12)
    expected = trained(x)
    pissa_to_lora(trained)
    assert trained.attn.query.lora.rank == 12 > min(12, 10)
    save_adapter(trained, tmp_path / "converted.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "converted.safetensors")
    assert type(loaded.attn.query) is LinearWithLoRA
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
