"""Trainable token rows (minigpt.tokens) against peft's TrainableTokens on the same GPT-2
weights."""

import copy

import pytest
import torch

from minigpt.lora import count_parameters, replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokens import TiedTokensHead, TrainableTokens, add_trainable_tokens

IDS = [3, 17, 250, 299]


def small_model(tie_weights: bool = True) -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=300, context_length=16, n_layer=2, n_head=2, n_embd=16, tie_weights=tie_weights
    )
    return GPTModel(cfg).eval()


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (2, 12), generator=g)
    idx[0, :4] = torch.tensor(IDS)  # the selected tokens do appear in the input
    return idx


def test_logits_equal_peft_trainable_tokens_on_the_same_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minigpt.hf import save_gpt2

    base = small_model()
    save_gpt2(base, tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    ref = peft.get_peft_model(hf, peft.TrainableTokensConfig(token_indices=IDS)).eval()

    ours = add_trainable_tokens(copy.deepcopy(base), IDS)
    delta = torch.randn(len(IDS), 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.tok_emb.delta.copy_(delta)
        w0 = base.tok_emb.weight[IDS]
        # peft stores the new rows themselves: values = W0[idx] + delta
        (values,) = [p for n, p in ref.named_parameters() if "trainable_tokens_delta" in n]
        values.copy_(w0 + delta)
    idx = batch()
    with torch.no_grad():
        expected = ref(input_ids=idx).logits
        got = ours(idx)
    assert not torch.allclose(got, base(idx))  # the delta changes the output ...
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # ... exactly as peft's does


def test_initialisation_leaves_the_model_unchanged_and_only_delta_trains():
    base = small_model()
    model = add_trainable_tokens(
        replace_linear_with_lora(copy.deepcopy(base), rank=2, alpha=4), IDS
    )
    assert isinstance(model.tok_emb, TrainableTokens) and isinstance(model.lm_head, TiedTokensHead)
    idx = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base(idx))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok_emb.delta" in trainable and not any("weight" in n for n in trainable)
    assert all(n == "tok_emb.delta" or ".lora." in n for n in trainable)
    lora_only = replace_linear_with_lora(copy.deepcopy(base), rank=2, alpha=4)
    assert count_parameters(model)[0] == count_parameters(lora_only)[0] + len(IDS) * 16


def test_gradients_reach_only_the_selected_rows_through_embedding_and_tied_head():
    model = add_trainable_tokens(small_model(), IDS)
    for p in model.parameters():
        p.requires_grad_(p is model.tok_emb.delta)
    model.tok_emb.embedding.weight.requires_grad_(True)  # to see where the gradient would go
    logits = model(batch())
    logits.sum().backward()
    w_grad = model.tok_emb.embedding.weight.grad
    assert model.tok_emb.delta.grad is not None and (model.tok_emb.delta.grad != 0).all(dim=1).all()
    # the merged weight's gradient on a selected row is exactly delta's gradient
    torch.testing.assert_close(model.tok_emb.delta.grad, w_grad[IDS])
    # tied: the head's gradient goes through the same rows (a token absent from the input still gets
    # one)
    only_in_head = add_trainable_tokens(small_model(), [5])
    idx = batch()
    idx[idx == 5] = 6
    only_in_head(idx).sum().backward()
    assert only_in_head.tok_emb.delta.grad.abs().sum() > 0
    assert only_in_head.tok_emb.embedding.weight.grad is None  # W0 stays frozen


def test_untied_model_wraps_only_the_embedding():
    model = add_trainable_tokens(small_model(tie_weights=False), IDS)
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        model.tok_emb.delta.fill_(1.0)
    torch.testing.assert_close(model.tok_emb.weight[IDS], model.tok_emb.embedding.weight[IDS] + 1.0)


def test_merged_embedding_and_token_state_dict_round_trip():
    base = small_model()
    model = add_trainable_tokens(copy.deepcopy(base), IDS)
    with torch.no_grad():
        model.tok_emb.delta.normal_()
    idx = batch()
    merged = copy.deepcopy(base)
    merged.tok_emb = model.tok_emb.merged_embedding()
    merged.lm_head.weight = merged.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), model(idx))
    other = add_trainable_tokens(copy.deepcopy(base), IDS)
    other.tok_emb.load_token_state_dict(model.tok_emb.token_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(idx), model(idx))
    with pytest.raises(ValueError, match="trains ids"):
        add_trainable_tokens(copy.deepcopy(base), [1, 2, 3, 4]).tok_emb.load_token_state_dict(
            model.tok_emb.token_state_dict()
        )


@pytest.mark.parametrize(
    "bad, error, message",
    [
        ([], ValueError, "token_indices is empty"),
        ([1, 300], ValueError, r"token_indices \[300\] are out of range"),
        ([-1], ValueError, "out of range"),
        ([4, 4], ValueError, "token_indices must be unique"),
        ([1.5], TypeError, "token_indices must hold integer"),
        ([True], TypeError, "token_indices must hold integer"),
        ("abc", TypeError, "token_indices must be a list"),
    ],
)
def test_bad_token_indices_are_refused_by_name(bad, error, message):
    model = small_model()
    with pytest.raises(error, match=message):
        add_trainable_tokens(model, bad)
    assert isinstance(model.tok_emb, torch.nn.Embedding)  # nothing changed
