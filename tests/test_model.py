import pytest
import torch
import torch.nn.functional as F

from minigpt.model import GPTConfig, GPTModel


def micro(**kw):
    return GPTConfig(
        **{**dict(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=16), **kw}
    )


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = GPTModel(micro()).eval()
    x = torch.randint(0, 64, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, 64)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    # positions before the change cannot see it; positions from 7 on can
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_gpt2_small_parameter_counts():
    with torch.device("meta"):
        tied = GPTModel(GPTConfig.from_preset("gpt2-small"))
        untied = GPTModel(GPTConfig.from_preset("gpt2-small", tie_weights=False))
    assert tied.num_parameters() == 124_439_808
    assert untied.num_parameters() == 124_439_808 + 50257 * 768


def test_tied_head_shares_the_embedding():
    model = GPTModel(micro())
    assert model.lm_head.weight is model.tok_emb.weight
    assert GPTModel(micro(tie_weights=False)).lm_head.weight is not GPTModel(micro()).tok_emb.weight


def test_attention_equals_explicit_softmax():
    """The fused kernel equals softmax(QK^T/sqrt(d) + mask) V written out by hand."""
    torch.manual_seed(0)
    cfg = micro()
    model = GPTModel(cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, cfg.n_embd)
    B, T, C = x.shape
    h = cfg.n_head
    q, k, v = (
        p(x).view(B, T, h, C // h).transpose(1, 2) for p in (attn.query, attn.key, attn.value)
    )
    scores = q @ k.transpose(-2, -1) / (C // h) ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.out_proj(y))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_head=3), "n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=-1), "vocab_size"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        micro(**kwargs)


def test_unknown_preset_and_bad_inputs():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")
    model = GPTModel(micro())
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPTModel({"n_layer": 2})
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layers": 2})
