"""A two-projection toy module that peft and our wrappers can both adapt (targets ``query`` and ``value``)."""

import torch
import torch.nn as nn

TARGETS = ["query", "value"]


class Attn(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.query, self.value = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)


class Toy(nn.Module):
    def __init__(self, d_in=12, d_out=10):
        super().__init__()
        self.attn = Attn(d_in, d_out)
        self.lm_head = nn.Linear(d_out, 7, bias=False)

    def forward(self, x):
        return self.lm_head(self.attn.query(x) * torch.sigmoid(self.attn.value(x)))
