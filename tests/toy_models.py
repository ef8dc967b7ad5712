"""A two-projection toy module that peft and our wrappers can both adapt (targets ``query`` and
``value``)."""

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


class NormAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.value = nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)


class ToyLM(nn.Module):
    """Submodules named like the course GPT's: attn.query, attn.value, attn.norm, mlp.fc,
    lm_head."""

    def __init__(self, d=8, vocab=11):
        super().__init__()
        self.attn, self.mlp = NormAttn(d), MLP(d)
        self.lm_head = nn.Linear(2 * d, vocab, bias=False)

    def forward(self, x):
        h = self.attn.norm(self.attn.query(x) + torch.tanh(self.attn.value(x)))
        return self.lm_head(torch.relu(self.mlp.fc(h)))


def randomise(model, seed=1, scale=0.5):
    """Training-like adapters: non-zero B (and a DoRA magnitude moved away from ||W0||), so they do
    something."""
    from minigpt.lora import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * scale)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return model


def peft_twin(base, ours, **config):
    """The project's central test pattern: a PEFT model on a copy of ``base`` holding the same
    adapter numbers as ``ours`` (``lora_A.weight = Aᵀ``, ``lora_B.weight = Bᵀ``, DoRA's magnitude),
    so both must agree."""
    import copy

    from peft import LoraConfig, get_peft_model

    from minigpt.lora import adapter_layers

    twin = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora.A.T)
            theirs.lora_B["default"].weight.copy_(layer.lora.B.T)
            if hasattr(layer, "magnitude"):
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return twin
