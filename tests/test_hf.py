"""Our GPT-2 equals Hugging Face's on the same weights (random weights built from a config: nothing
downloaded)."""

import hashlib
import http.server
import json
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from minigpt.hf import download_gpt2, load_gpt2

hf_logging.set_verbosity_error()


def hf_model(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=97,
        n_positions=24,
        n_embd=48,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers(tmp_path, tie):
    ref = hf_model(tmp_path, tie_word_embeddings=tie)
    ours = load_gpt2(tmp_path)
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)
    assert (ours.lm_head.weight is ours.tok_emb.weight) == tie


def test_refuses_unsupported_and_incomplete(tmp_path):
    hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        load_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_gpt2(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="shape"):
        load_gpt2(tmp_path)


def test_download_from_local_server(tmp_path):
    """download_gpt2 against files served on 127.0.0.1: checksum checked, nothing half-written."""
    src = tmp_path / "src"
    hf_model(src)
    files = {name: (src / name).read_bytes() for name in ("config.json", "model.safetensors")}
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            self.send_response(200)
            if name == "model.safetensors":
                self.send_header("X-Linked-Etag", f'"{digest}"')
            self.end_headers()
            self.wfile.write(files[name])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        dest = download_gpt2(tmp_path / "dl", endpoint=endpoint)
        x = torch.randint(0, 97, (1, 8))
        torch.testing.assert_close(load_gpt2(dest)(x), load_gpt2(src)(x))
        with pytest.raises(ValueError, match="sha256"):
            download_gpt2(tmp_path / "bad", endpoint=endpoint, sha256="0" * 64)
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    finally:
        server.shutdown()
    with pytest.raises(ConnectionError, match="internet"):
        download_gpt2(tmp_path / "off", endpoint=endpoint, timeout=2)
