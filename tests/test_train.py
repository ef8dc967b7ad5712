import os

import numpy as np
import pytest
import torch

from minigpt.data import make_loader
from minigpt.generate import generate, generate_text
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import (
    TrainConfig,
    choose_device,
    load_checkpoint,
    load_model,
    nats_per_character,
    save_checkpoint,
    train,
)

CFG = GPTConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, n_embd=16)
IDS = np.tile(np.arange(32), 40)  # a learnable pattern: next token = current + 1


def run(steps=12, seed=0, **kw):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    loader = make_loader(IDS, 8, 4, seed=seed)
    history = train(
        model,
        loader,
        make_loader(IDS, 8, 4, shuffle=False),
        TrainConfig(
            steps=steps,
            lr=1e-2,
            warmup_steps=2,
            eval_interval=6,
            eval_batches=2,
            seed=seed,
            progress=False,
            device="cpu",  # the CPU reference; tests/test_device.py covers the other devices
        ),
        **kw,
    )
    return model, history


def test_loss_decreases_and_history_is_complete():
    _, h = run(steps=40)
    assert len(h.train_loss) == 40 and h.eval_steps == [6, 12, 18, 24, 30, 36, 40]
    assert np.mean(h.train_loss[-5:]) < np.mean(h.train_loss[:5]) - 0.5
    assert h.tokens == 40 * 4 * 8


def test_same_seed_same_losses():
    assert run(seed=1)[1].train_loss == run(seed=1)[1].train_loss
    assert run(seed=1)[1].train_loss != run(seed=2)[1].train_loss


def test_resume_equals_uninterrupted(tmp_path):
    _, full = run(steps=12, seed=3)
    ckpt = tmp_path / "run.safetensors"
    _, first = run(steps=12, seed=3, checkpoint=ckpt, stop_after=5)
    assert load_checkpoint(ckpt, GPTModel(CFG))["step"] == 5
    _, second = run(steps=12, seed=3, checkpoint=ckpt, resume=True)
    np.testing.assert_allclose(first.train_loss + second.train_loss, full.train_loss, rtol=1e-5)


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model, _ = run(steps=3)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, step=3, extra={"note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    reloaded = load_model(path, "cpu")
    x = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(reloaded(x), model(x))
    assert reloaded.lm_head.weight is reloaded.tok_emb.weight
    other = GPTModel(GPTConfig(vocab_size=32, context_length=8, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="n_layer"):
        load_checkpoint(path, other)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(truncated)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))


def test_device_choice():
    assert choose_device("cpu").type == "cpu"
    assert choose_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        choose_device("tpu")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)


def test_generation_greedy_sampling_and_eos():
    model, _ = run(steps=60)
    out = generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=4)
    assert out[0].tolist() == [3, 4, 5, 6, 7, 8, 9]  # it learned the +1 pattern
    g = torch.Generator().manual_seed(0)
    a = generate(model, torch.tensor([[3]]), 5, temperature=1.0, top_k=3, generator=g)
    b = generate(
        model,
        torch.tensor([[3]]),
        5,
        temperature=1.0,
        top_k=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(a, b)
    prompts = torch.tensor([[3, 4], [20, 21]])
    free = generate(model, prompts, 8)
    eos = int(free[0, 4])
    stopped = generate(model, prompts, 8, eos_id=eos)
    for row, ref in zip(stopped.tolist(), free.tolist(), strict=False):
        new, ref_new = row[2:], ref[2:]
        cut = ref_new.index(eos) + 1 if eos in ref_new else len(ref_new)
        assert new[:cut] == ref_new[:cut]  # identical until eos...
        assert all(t == eos for t in new[cut:])  # ...then padded with eos
    if all(eos in r[2:] for r in free.tolist()):
        assert stopped.shape[1] < free.shape[1]  # stops once every row has finished
    text = generate_text(
        model,
        "d",
        encode=lambda s: [ord(c) - 97 for c in s],
        decode=lambda ids: "".join(chr(i + 97) for i in ids),
        max_new_tokens=3,
    )
    assert text == "efg"
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.tensor([[1]]), 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.tensor([[1]]), 2, temperature=-1)


def test_nats_per_character():
    model, _ = run(steps=3)
    result = nats_per_character(model, IDS, decode=lambda ids: "ab" * len(ids))
    assert result["chars"] == 2 * result["tokens"]
    assert result["nats_per_char"] == pytest.approx(result["nats_per_token"] / 2)


def test_masked_loss_computes_the_head_only_where_it_counts():
    """With ignored (-100) targets the loss skips the head at those positions: same value, same
    gradients."""
    from minigpt.train import loss_fn

    torch.manual_seed(0)
    model = GPTModel(CFG)
    inputs = torch.randint(0, 32, (3, 8))
    targets = torch.randint(0, 32, (3, 8))
    targets[:, ::3] = -100
    calls = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    ours = loss_fn(model, inputs, targets)
    hook.remove()
    assert calls == [int((targets != -100).sum())]  # the head saw only the kept positions
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = torch.nn.functional.cross_entropy(
        model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    reference.backward()
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(ours_grads, (p.grad for p in model.parameters()), strict=False):
        torch.testing.assert_close(mine, theirs)
    assert torch.equal(model.lm_head(model.hidden(inputs)), model(inputs))


def test_precision_is_resolved_and_checked(monkeypatch):
    from minigpt._validate import UserError
    from minigpt.train import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.delenv("MINIGPT_PRECISION", raising=False)
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr("minigpt.device.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"  # emulated bf16 would be slower
    monkeypatch.setattr("minigpt.device.cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setenv("MINIGPT_PRECISION", "fp32")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setenv("MINIGPT_PRECISION", "half")
    with pytest.raises(UserError, match="MINIGPT_PRECISION must be one of auto, fp32, bf16"):
        resolve_precision("auto", cpu)
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, got 'half'"):
        resolve_precision("half", cpu)
    with pytest.raises(UserError, match="TrainConfig.precision must be one of"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_runs_in_the_resolved_precision(precision):
    seen = []
    torch.manual_seed(0)
    model = GPTModel(CFG)
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    history = train(
        model,
        make_loader(IDS, 8, 4, seed=0),
        None,
        TrainConfig(
            steps=30, lr=1e-2, warmup_steps=2, progress=False, precision=precision, device="cpu"
        ),
    )
    assert history.precision == precision
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert np.mean(history.train_loss[-5:]) < np.mean(history.train_loss[:5]) - 0.5


def test_cpu_bf16_attention_runs_in_float32_and_matches():
    from minigpt.model import causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    # the float32 kernel on the bf16 inputs, rounded once at the end: bit for bit
    want = torch.nn.functional.scaled_dot_product_attention(
        q16.float(), k16.float(), v16.float(), is_causal=True
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_attention(q16, k16, v16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16(), atol=0, rtol=0)
    got.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_keep_freed_memory_respects_a_configured_malloc(monkeypatch):
    import minigpt

    monkeypatch.setattr(minigpt, "_HEAP_KEPT", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert minigpt.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("MINIGPT_MALLOC", "default")
    assert minigpt.keep_freed_memory() is False
    monkeypatch.delenv("MINIGPT_MALLOC")
    for key in [
        k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")
    ]:
        monkeypatch.delenv(key)
    assert minigpt.keep_freed_memory() is True  # the test machines run Linux with glibc
    assert minigpt.keep_freed_memory() is True  # idempotent


def muon_run(steps=12, seed=3, **kw):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    history = train(
        model,
        make_loader(IDS, 8, 4, seed=seed),
        None,
        TrainConfig(
            steps=steps,
            lr=1e-2,
            warmup_steps=2,
            seed=seed,
            progress=False,
            optimizer="muon",
            device="cpu",
        ),
        **kw,
    )
    return model, history


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from minigpt.train import MuonWithAdamW, make_optimizer

    model = GPTModel(CFG)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    assert in_muon == {
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2
    }
    in_adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert "tok_emb.weight" in in_adamw and not in_adamw & in_muon
    # the tied head is the embedding
    assert len(in_adamw | in_muon) == len(list(model.parameters()))
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon"):
        TrainConfig(optimizer="sgd")


def test_a_muon_step_is_orthogonal():
    """Muon's update of a matrix has all its singular values close to one another (1.0 after exact
    orthogonalisation); AdamW's first step (lr times the gradient's signs) has a random matrix's
    spread."""
    from minigpt.train import make_optimizer

    updates = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = GPTModel(CFG)
        cfg = TrainConfig(lr=1e-3, weight_decay=0.0, optimizer=name)
        optimizer = make_optimizer(model, cfg)
        # square: AdamW's spread is wide
        before = model.blocks[0].attn.query.weight.detach().clone()
        # five Newton-Schulz steps bring every singular value to ~0.7-1.2
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        optimizer.step()
        updates[name] = torch.linalg.svdvals(model.blocks[0].attn.query.weight.detach() - before)
    spread = {name: float(s.max() / s.min()) for name, s in updates.items()}
    assert spread["muon"] < 2.0 and spread["adamw"] > 5.0, spread


def test_muon_resume_equals_uninterrupted(tmp_path):
    _, full = muon_run()
    ckpt = tmp_path / "run.safetensors"
    _, first = muon_run(checkpoint=ckpt, stop_after=5)
    _, second = muon_run(checkpoint=ckpt, resume=True)
    np.testing.assert_allclose(first.train_loss + second.train_loss, full.train_loss, rtol=1e-5)
    assert np.mean(full.train_loss[-3:]) < np.mean(full.train_loss[:3])
    adamw_ckpt = tmp_path / "adamw.safetensors"
    run(steps=2, checkpoint=adamw_ckpt)
    with pytest.raises(ValueError, match="parameter groups"):
        muon_run(checkpoint=adamw_ckpt, resume=True)


def test_batched_muon_matches_torch_muon():
    """minigpt.muon.BatchedMuon batches the Newton-Schulz iterations; its steps are
    torch.optim.Muon's."""
    from minigpt.muon import BatchedMuon

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch 2.9 or later")

    torch.manual_seed(0)
    ours = [
        torch.nn.Parameter(torch.randn(shape)) for shape in ((16, 16), (16, 16), (64, 16), (16, 64))
    ]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    optimizers = BatchedMuon(ours, **settings), torch.optim.Muon(reference, **settings)
    for _ in range(3):
        for a, b in zip(ours, reference, strict=False):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(ours, reference, strict=False):
        # bf16 iterations: batched vs one by one
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)
    assert optimizers[0].state_dict()["state"][0]["momentum_buffer"].shape == (16, 16)
    from minigpt.muon import NS_COEFFICIENTS

    assert optimizers[1].defaults["ns_coefficients"] == NS_COEFFICIENTS


def test_the_recipe_optimizer_reaches_pretraining():
    """A recipe's optimizer is part of its cache key and pretrain() trains with it; the course's
    base is AdamW-pretrained, as the papers' models are (its name carries no optimizer tag)."""
    from dataclasses import replace

    from minigpt.lab.pretrained import SMOKE, TINY, pretrain

    assert TINY.optimizer == "adamw" and "muon" not in TINY.name and "muon" not in SMOKE.name
    assert "-muon-" in replace(TINY, optimizer="muon").name
    short = replace(SMOKE, steps=3)
    losses = {
        name: pretrain(replace(short, optimizer=name), progress=False)[1].train_loss
        for name in ("adamw", "muon")
    }
    assert losses["adamw"][0] == losses["muon"][0]  # the same start; the first update differs
    assert losses["adamw"][1:] != losses["muon"][1:]


def test_batched_muon_refuses_what_it_cannot_train():
    from minigpt.muon import BatchedMuon

    with pytest.raises(ValueError, match="matrices only.*\\(16,\\)"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(16))])
    with pytest.raises(ValueError, match="adjust_lr_fn must be one of"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="adamw")
    from minigpt.muon import newton_schulz

    with pytest.raises(
        ValueError, match=r"matrices must be a \(batch, rows, cols\) stack, got shape \(4, 4\)"
    ):
        newton_schulz(torch.ones(4, 4))
