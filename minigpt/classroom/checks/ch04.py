"""Checks for chapter 04 (the GPT model): the notebook's layers and helpers against PyTorch and the
package.

References: ``F.layer_norm``, ``F.gelu(approximate="tanh")``, ``F.rms_norm`` and ``minigpt.model``.
Each check tests one function of the notebook; where that function calls another notebook function
(``layer_norm``, ``gelu``, ``generate_greedy``), the check swaps in a reference for the helper, so
one mistake fails one check.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minigpt.classroom.checks import assign, check, inside, seeded, using
from minigpt.generate import generate
from minigpt.model import Block, CausalSelfAttention, GPTConfig, GPTModel

MICRO = GPTConfig(vocab_size=53, context_length=12, n_layer=2, n_head=2, n_embd=16)


def _ref_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _ref_gelu(x):
    return F.gelu(x, approximate="tanh")


@torch.no_grad()
def _ref_greedy(model, idx, max_new_tokens):
    return generate(model, idx, max_new_tokens, temperature=0)


def _randomise_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every LayerNorm a non-trivial scale and shift, so a check sees whether they are used."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm):
                sub.weight.copy_(1 + 0.3 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.3 * torch.randn(sub.bias.shape, generator=generator))


@check(points=2)
def layer_norm_matches_torch(nb):
    """layer_norm (and the LayerNorm module) equal F.layer_norm / nn.LayerNorm, biased variance, eps
    inside the root."""
    g = torch.Generator().manual_seed(401)
    for shape, eps in (((4, 8), 1e-5), ((2, 3, 16), 1e-5), ((5, 6), 1e-2), ((1, 1, 7), 1e-5)):
        x = 2.0 + 3.0 * torch.randn(shape, generator=g)
        weight = torch.randn(shape[-1], generator=g)
        bias = torch.randn(shape[-1], generator=g)
        got = nb.layer_norm(x, weight, bias, eps)
        torch.testing.assert_close(
            got,
            F.layer_norm(x, shape[-1:], weight, bias, eps),
            msg=lambda m, shape=shape, eps=eps: (
                f"layer_norm on shape {shape} with eps={eps} differs from F.layer_norm: {m}. "
                "Normalise over the last "
                "dimension with the biased variance (unbiased=False) and eps inside the square root"
            ),
        )
    module, reference = nb.LayerNorm(16), torch.nn.LayerNorm(16)
    x = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(
        module(x), reference(x), msg="LayerNorm(16) at initialisation must equal nn.LayerNorm(16)"
    )
    names = sorted(n for n, _ in module.named_parameters())
    assert names == ["bias", "weight"], (
        f"LayerNorm should have parameters 'weight' and 'bias', got {names}"
    )


@check(points=2)
def gelu_matches_torch_tanh_form(nb):
    """gelu equals F.gelu(approximate="tanh") (GPT-2's form, not the exact erf form)."""
    x = torch.cat([torch.linspace(-8, 8, 1601), torch.tensor([-30.0, -12.0, 0.0, 12.0, 30.0])])
    torch.testing.assert_close(
        nb.gelu(x),
        F.gelu(x, approximate="tanh"),
        msg=lambda m: (
            f"gelu differs from F.gelu(x, approximate='tanh'): {m}. Use "
            "0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), not the exact x * Phi(x)"
        ),
    )
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(402))
    assert nb.gelu(x).shape == x.shape, "gelu must keep the input's shape"


@check(points=1)
def shortcut_connections_keep_gradients(nb):
    """DeepNet adds x + f(x) only with shortcuts; gradient_magnitudes returns each layer's mean
    |grad|."""
    with using(nb, gelu=_ref_gelu):
        sizes = [8] * 11 + [1]
        x, target = (
            torch.randn(4, 8, generator=torch.Generator().manual_seed(403)),
            torch.zeros(4, 1),
        )
        grads = {}
        for use_shortcut in (False, True):
            model = inside(seeded, 0, nb.DeepNet, sizes, use_shortcut)
            assert len(model.layers) == len(sizes) - 1, (
                "DeepNet needs one Linear per consecutive pair of sizes"
            )
            # the check's own random weights, copied into the notebook's model: the expected
            # gradients never come from weights the notebook chose
            gen = torch.Generator().manual_seed(420 + use_shortcut)
            weights = []
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
                bound = 1 / math.sqrt(n_in)  # nn.Linear's own initialisation, drawn here
                weight = (2 * torch.rand(n_out, n_in, generator=gen) - 1) * bound
                inside(assign, model, f"layers.{i}.weight", weight)
                bias = None
                if model.layers[i].bias is not None:
                    bias = (2 * torch.rand(n_out, generator=gen) - 1) * bound
                    inside(assign, model, f"layers.{i}.bias", bias)
                weights.append((weight.requires_grad_(True), bias))
            got = nb.gradient_magnitudes(model, x, target)
            # the expected gradients: this process's own forward and backward on those weights
            h = x
            for weight, bias in weights:
                out = F.gelu(F.linear(h, weight, bias), approximate="tanh")
                h = h + out if use_shortcut and out.shape == h.shape else out
            F.mse_loss(h, target).backward()
            want = [weight.grad.abs().mean().item() for weight, _ in weights]
            torch.testing.assert_close(
                torch.tensor(got),
                torch.tensor(want),
                msg=lambda m, use_shortcut=use_shortcut: (
                    f"gradient_magnitudes(shortcut={use_shortcut}) should be the mean |dL/dW| of "
                    "each layer after "
                    f"one backward pass of F.mse_loss: {m}"
                ),
            )
            grads[use_shortcut] = got
        assert grads[True][0] > 100 * grads[False][0], (
            f"with shortcuts the first layer's gradient ({grads[True][0]:.1e}) should dwarf the "
            "one without "
            f"({grads[False][0]:.1e})"
        )


@check(points=2)
def transformer_block_forward_matches_package(nb):
    """causal_attention_forward and transformer_block_forward equal the package's attention and
    Block."""
    g = torch.Generator().manual_seed(404)
    torch.manual_seed(404)
    with using(nb, layer_norm=_ref_layer_norm, gelu=_ref_gelu), torch.no_grad():
        attn = CausalSelfAttention(MICRO).eval()
        x = torch.randn(2, 9, MICRO.n_embd, generator=g)
        torch.testing.assert_close(
            nb.causal_attention_forward(attn, x),
            attn(x),
            msg=lambda m: (
                f"causal_attention_forward differs from CausalSelfAttention: {m}. Check the "
                "1/sqrt(head_dim) "
                "scaling, the causal mask (no attention to later positions) and how heads are "
                "split and merged"
            ),
        )
        block = Block(MICRO).eval()
        _randomise_norms(block, g)
        torch.testing.assert_close(
            nb.transformer_block_forward(block, x),
            block(x),
            msg=lambda m: (
                f"transformer_block_forward differs from minigpt.model.Block: {m}. A pre-LN block "
                "is "
                "x + attn(ln_1(x)), then x + mlp(ln_2(x))"
            ),
        )


@check(points=1)
def gpt_forward_matches_package(nb):
    """gpt_forward equals GPTModel's logits, with a tied and with an untied head."""
    g = torch.Generator().manual_seed(405)
    with using(nb, layer_norm=_ref_layer_norm, gelu=_ref_gelu), torch.no_grad():
        for tie in (True, False):
            torch.manual_seed(405)
            model = GPTModel(GPTConfig(**{**MICRO.to_dict(), "tie_weights": tie})).eval()
            _randomise_norms(model, g)
            idx = torch.randint(0, MICRO.vocab_size, (3, MICRO.context_length), generator=g)
            torch.testing.assert_close(
                nb.gpt_forward(model, idx),
                model(idx),
                msg=lambda m, tie=tie: (
                    f"gpt_forward (tie_weights={tie}) differs from GPTModel: {m}. Token + position "
                    "embeddings, the "
                    "blocks, ln_f, then the output head lm_head"
                ),
            )


@check(points=1)
def notebook_model_classes_match_package(nb):
    """The notebook's MLP, Block and GPTModel build the same modules, weights and outputs as
    minigpt.model."""
    import minigpt.model as package

    for name in ("MLP", "Block", "GPTModel"):
        ours = inside(seeded, 406, getattr(nb, name), MICRO)
        torch.manual_seed(406)
        theirs = getattr(package, name)(MICRO)
        ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
        assert list(ours_state) == list(theirs_state), (
            f"{name}: parameter names differ from minigpt.model.{name}"
        )
        for key in theirs_state:
            torch.testing.assert_close(
                ours_state[key], theirs_state[key], msg=f"{name}.{key} differs after the same seed"
            )
    idx = torch.randint(0, MICRO.vocab_size, (2, 7), generator=torch.Generator().manual_seed(406))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), theirs.eval()(idx))


@check(points=2)
def count_parameters_matches_package(nb):
    """count_parameters(cfg) equals the built model's count: 124,439,808 for GPT-2 small (tied)."""
    assert nb.count_parameters(GPTConfig.from_preset("gpt2-small")) == 124_439_808, (
        "count_parameters(gpt2-small) returned "
        f"{nb.count_parameters(GPTConfig.from_preset('gpt2-small'))!r}; "
        "GPT-2 small with a tied head has 124,439,808 parameters"
    )
    configs = [
        GPTConfig.from_preset("gpt2-small", tie_weights=False),
        GPTConfig.from_preset("tiny"),
        GPTConfig.from_preset("micro", tie_weights=False),
        GPTConfig(n_layer=3, n_embd=96, n_head=4, bias=False),
        GPTConfig(
            vocab_size=1000,
            context_length=64,
            n_layer=5,
            n_head=3,
            n_embd=48,
            bias=False,
            tie_weights=False,
        ),
    ]
    for cfg in configs:
        with torch.device("meta"):
            want = GPTModel(cfg).num_parameters()
        got = nb.count_parameters(cfg)
        assert got == want, (
            f"count_parameters returned {got!r} for {cfg}; the model has {want:,} parameters "
            "(untied heads add V*C; bias=False removes the Linear biases, LayerNorms keep theirs)"
        )


@check(points=1)
def generate_greedy_matches_package(nb):
    """generate_greedy appends arg-max tokens, crops to the context window, and equals
    generate(temperature=0)."""
    torch.manual_seed(407)
    model = GPTModel(MICRO).eval()
    for length in (3, 20):
        idx = torch.randint(
            0, MICRO.vocab_size, (2, length), generator=torch.Generator().manual_seed(length)
        )
        got = nb.generate_greedy(model, idx, 4)
        torch.testing.assert_close(
            got,
            generate(model, idx, 4, temperature=0),
            msg=lambda m, length=length: (
                f"generate_greedy with a prompt of {length} tokens (context "
                f"{MICRO.context_length}) differs from "
                f"minigpt.generate.generate(temperature=0): {m}"
            ),
        )


@check(points=1)
def exercise_1_parameter_breakdown_adds_up(nb):
    """exercise_1_parameter_breakdown splits the count into embeddings/attention/mlp/layernorm/head
    correctly."""
    for cfg in (
        GPTConfig.from_preset("gpt2-small"),
        GPTConfig.from_preset("tiny", tie_weights=False),
        GPTConfig(vocab_size=100, context_length=16, n_layer=3, n_head=2, n_embd=8, bias=False),
    ):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPTModel(cfg)
        want = {"embeddings": 0, "attention": 0, "mlp": 0, "layernorm": 0, "head": 0}
        for name, param in model.named_parameters():  # shared (tied) tensors are listed once
            kind = (
                "embeddings"
                if "emb" in name
                else "attention"
                if ".attn." in name
                else "mlp"
                if ".mlp." in name
                else "layernorm"
                if "ln_" in name
                else "head"
            )
            want[kind] += param.numel()
        got = nb.exercise_1_parameter_breakdown(cfg)
        assert dict(got) == want, f"for {cfg} expected {want}, got {got}"


@check(points=1)
def exercise_2_adamw_memory_is_exact(nb):
    """exercise_2_adamw_memory_bytes = (n_params + 3 n_trainable) * bytes per element."""
    for n, trainable, dtype, size in (
        (124_439_808, 124_439_808, torch.float32, 4),
        (1000, 10, torch.bfloat16, 2),
        (1000, 0, torch.float32, 4),
        (7, 7, torch.float64, 8),
    ):
        got, want = (
            nb.exercise_2_adamw_memory_bytes(n, trainable, dtype),
            (n + 3 * trainable) * size,
        )
        assert got == want, (
            f"exercise_2_adamw_memory_bytes({n}, {trainable}, {dtype}) returned {got!r}; weights "
            f"{n} + gradient and two moments for {trainable}, at {size} bytes each = {want}"
        )


@check(points=1)
def exercise_3_rms_norm_matches_torch(nb):
    """exercise_3_rms_norm equals F.rms_norm for several shapes and eps."""
    g = torch.Generator().manual_seed(408)
    for shape, eps in (((4, 8), 1e-6), ((2, 3, 16), 1e-6), ((3, 5), 0.5)):
        x, weight = 1.0 + torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
        torch.testing.assert_close(
            nb.exercise_3_rms_norm(x, weight, eps),
            F.rms_norm(x, shape[-1:], weight, eps),
            msg=lambda m, shape=shape, eps=eps: (
                f"exercise_3_rms_norm (shape {shape}, eps {eps}) != F.rms_norm: {m}"
            ),
        )


@check(points=1)
def exercise_4_generates_beyond_context(nb):
    """exercise_4_generate_beyond_context returns only the new tokens and slides the window over
    long prompts."""
    torch.manual_seed(409)
    model = GPTModel(MICRO).eval()
    idx = torch.randint(
        0,
        MICRO.vocab_size,
        (2, 3 * MICRO.context_length + 1),
        generator=torch.Generator().manual_seed(1),
    )
    with using(nb, generate_greedy=_ref_greedy):
        got = nb.exercise_4_generate_beyond_context(model, idx, 4)
    assert tuple(got.shape) == (2, 4), (
        f"expected only the 4 new tokens per row, shape (2, 4), got {tuple(got.shape)}"
    )
    want = generate(model, idx[:, -MICRO.context_length :], 4, temperature=0)[:, -4:]
    torch.testing.assert_close(
        got,
        want,
        msg="the new tokens must be greedy predictions from the last context_length tokens",
    )
