import numpy as np
import torch

from minigpt.data import Example
from minigpt.finetune import answer, finetune_data, task_accuracy
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import get_compact_vocab


def test_finetune_data_is_deterministic_and_disjoint():
    data = finetune_data()
    assert np.array_equal(data.train_ids, finetune_data.__wrapped__().train_ids)
    vocab = get_compact_vocab()
    train_text = vocab.decode(data.train_ids[:20000])
    assert "Reverse: " in train_text or "Add: " in train_text
    held_out = vocab.decode(data.domain_val_ids[:200])
    assert held_out[:100] not in vocab.decode(data.train_ids)
    assert len(data.task_eval) == 200


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
    assert answer(Echo(newline), ["Add: 1 + 1 =", "Reverse: abc ->"]) == ["", ""]
    seven = vocab.encode("7")[0]
    assert answer(Echo(seven), ["Add: 3 + 4 ="], max_new_tokens=1) == ["7"]
    examples = [Example("Add: 3 + 4 =", "7"), Example("Add: 1 + 1 =", "2")]
    model = Echo(seven)
    assert task_accuracy(model, examples) == 0.0  # "77777777" is not "7"
    assert task_accuracy(GPTModel(GPTConfig.from_preset("micro")), examples) in (0.0, 0.5, 1.0)
