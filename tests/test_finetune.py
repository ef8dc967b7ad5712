import numpy as np
import torch

from minigpt.data import Example
from minigpt.generate import generate, last_logits
from minigpt.lab.task import answer, finetune_data, task_accuracy
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import get_compact_vocab


def test_finetune_data_is_deterministic_and_disjoint():
    data = finetune_data()
    assert np.array_equal(data.train_ids, finetune_data.__wrapped__().train_ids)
    assert data.train_mask.shape == data.train_ids.shape and 0 < data.train_mask.mean() < 1
    vocab = get_compact_vocab()
    train_text = vocab.decode(data.train_ids)
    assert "Turn " in train_text
    held_out = vocab.decode(data.domain_val_ids[:200])
    assert held_out[:100] not in train_text
    assert len(data.task_eval) == 200 and len(data.task_val) == 100
    assert not {e.prompt for e in data.task_eval} & {e.prompt for e in data.task_val}
    assert all(e.prompt not in train_text for e in data.task_eval)


class Echo(torch.nn.Module):
    """A fake model that always predicts one fixed token: answers are that token repeated."""

    def __init__(self, token: int):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=4096, context_length=64, n_layer=1, n_head=1, n_embd=8)
        self.token = token
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 4096)
        logits[..., self.token] = 1.0
        return logits


def test_answer_and_accuracy():
    vocab = get_compact_vocab()
    newline = vocab.encode("\n")[0]
    assert answer(Echo(newline), ["Turn a b c:", "Turn to be or:"]) == ["", ""]
    lord = vocab.encode(" lord")[0]
    assert answer(Echo(lord), ["Turn a b c:"], max_new_tokens=1) == [" lord"]
    examples = [Example("Turn my lord:", "lord"), Example("Turn a b c:", "c b a")]
    model = Echo(lord)
    assert task_accuracy(model, examples) == 0.0  # " lord lord lord ..." is not "lord"
    assert task_accuracy(Echo(lord), examples[:1] * 2) == 0.0
    assert task_accuracy(GPTModel(GPTConfig.from_preset("micro")), examples) in (0.0, 0.5, 1.0)


class Wrapped(torch.nn.Module):
    """A model answer() cannot recognise as a GPTModel: it takes the logits of every position."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, idx):
        return self.model(idx)


def test_answer_takes_the_head_at_the_last_position_only_with_the_same_answers():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro")).eval()
    idx = torch.randint(0, 4096, (3, 7))
    torch.testing.assert_close(last_logits(model, idx), model(idx)[:, -1], rtol=1e-5, atol=1e-5)
    prompts = ["Turn a b c:", "Turn to be or:", "Turn my good lord:", "Turn x y z:"]
    assert answer(model, prompts, max_new_tokens=4) == answer(
        Wrapped(model), prompts, max_new_tokens=4
    )
    for temperature in (0.0, 1.0):  # generate() decodes through the same helper, greedy and sampled
        outs = [
            generate(m, idx, 5, temperature, generator=torch.Generator().manual_seed(1))
            for m in (model, Wrapped(model))
        ]
        assert torch.equal(*outs)


class Scripted(torch.nn.Module):
    """A fake model whose rows end their line at different steps (or never): counts its calls."""

    def __init__(self, stops: dict[int, int]):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=4096, context_length=64, n_layer=1, n_head=1, n_embd=8)
        self.stops, self.calls = stops, 0  # second prompt token -> newline after so many tokens
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = get_compact_vocab()
        self.start = None

    def forward(self, idx):
        self.calls += 1
        self.start = self.start or idx.shape[1]
        logits = torch.zeros(*idx.shape, 4096)
        for row, first in enumerate(idx[:, 1].tolist()):
            generated = idx.shape[1] - self.start
            stop = self.stops.get(first)
            text = "\n\n" if generated == stop else " lord"
            logits[row, :, self.vocab.encode(text)[0]] = 1.0
        return logits


def test_answer_stops_once_every_row_has_ended_its_line_with_the_same_answers():
    vocab = get_compact_vocab()
    prompts = ["Turn a b c:", "Turn to be or:"]  # one batch: prompts of the same length
    encoded = [vocab.encode(p) for p in prompts]
    assert len(encoded[0]) == len(encoded[1])
    firsts = [ids[1] for ids in encoded]
    assert firsts[0] != firsts[1]
    # one row ends after 1 token (with the two-newline token), the other after 3: 4 calls, not 6
    model = Scripted({firsts[0]: 1, firsts[1]: 3})
    assert answer(model, prompts, max_new_tokens=6) == [" lord", " lord lord lord"]
    assert model.calls == 4
    # a row that never ends its line keeps the whole budget
    model = Scripted({firsts[0]: 1})
    assert answer(model, prompts, max_new_tokens=6) == [" lord", " lord" * 6]
    assert model.calls == 6
