import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from minigpt import data


def test_shakespeare_is_a_clean_play_script():
    text = data.shakespeare_text()
    assert 4_000_000 < len(text) < 6_000_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    for leftover in ("**", "\\-", "_Enter", "\n#", "  \n"):
        assert leftover not in text, leftover
    assert data.shakespeare_text() is data.shakespeare_text()  # cached, deterministic


def test_clean_play_rules():
    md = (
        "# Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**A**  \nHello there,  \n_\\[Aside]_  \n"
        "friend\\--yes.\n\n**B**  \nGood day.\n"
    )
    assert data.clean_play(md) == "A:\nHello there,\nfriend--yes.\n\nB:\nGood day.\n\n"


def test_python_docs_is_the_second_domain():
    text = data.python_docs_text()
    assert 300_000 < len(text) < 800_000
    assert "lambda" in text and "THESEUS" not in text


def test_task_examples_are_seeded_correct_and_held_out():
    a, b = data.make_task_examples(50, seed=1), data.make_task_examples(50, seed=1)
    assert a == b and a != data.make_task_examples(50, seed=2)
    words = set(data.task_words())
    for ex in a:
        triple = ex.prompt.removeprefix("Turn ").removesuffix(":").split()
        assert len(triple) == 3 and set(triple) <= words
        assert ex.answer.split() == triple[::-1]
    train = {e.prompt for e in data.make_task_examples(3000, seed=0)}
    held = {e.prompt for e in data.make_task_examples(300, seed=5, held_out=True)}
    assert not train & held  # evaluation triples never occur in training
    assert data.exact_match_accuracy([e.answer for e in a], a) == 1.0
    assert data.exact_match_accuracy(["x"] * 50, a) == 0.0
    with pytest.raises(ValueError, match="n must"):
        data.make_task_examples(-1)
    with pytest.raises(ValueError, match="same length"):
        data.exact_match_accuracy([], a)


def test_task_words_are_single_known_tokens():
    from minigpt.tokenizer import get_compact_vocab

    vocab = get_compact_vocab()
    words = data.task_words()
    assert len(words) == data.TASK_WORDS
    assert all(len(vocab.encode(" " + w)) == 1 for w in words)


def test_answer_mask_covers_answers_only():
    from minigpt.tokenizer import get_compact_vocab

    vocab = get_compact_vocab()
    examples = data.make_task_examples(3, seed=0)
    ids, mask = data.encode_examples(examples, vocab.encode)
    assert len(ids) == len(mask)
    assert vocab.decode(ids) == "".join(e.text for e in examples)
    answers = vocab.decode(ids[mask])
    assert answers == "".join(f" {e.answer}\n" for e in examples)
    loader = data.make_loader(ids, 8, 2, shuffle=False, loss_mask=mask)
    inputs, targets = next(iter(loader))
    expected = torch.as_tensor(ids[1:9]).masked_fill(~torch.as_tensor(mask[1:9]), -100)
    assert torch.equal(targets[0], expected) and torch.equal(inputs[0], torch.as_tensor(ids[:8]))


def test_splits_are_disjoint_and_pretraining_covers_finetuning():
    parts = data.docs_parts()
    assert not set(parts["pretrain"]) & set(parts["finetune"])
    assert not set(parts["finetune"]) & set(parts["validation"])
    sh_train, sh_val = data.shakespeare_parts()
    assert sh_train + sh_val == data.shakespeare_text()
    from minigpt.lab.pretrained import unseen_in_finetuning

    # the committed vocabulary is built from pretraining's texts
    assert unseen_in_finetuning() == 0.0
    assert data.unseen_share(np.array([1, 2, 3]), np.array([1, 4, 4, 2])) == 0.5


def test_windows_and_split():
    ids = np.arange(21)
    ds = data.TokenWindows(ids, max_length=4, stride=2)
    x, y = ds[1]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]
    assert len(ds) == 9
    train, val = data.train_val_split(ids, 0.2)
    assert len(train) == 16 and len(val) == 5 and np.array_equal(np.concatenate([train, val]), ids)
    with pytest.raises(ValueError, match="max_length"):
        data.TokenWindows(ids, max_length=0, stride=1)
    with pytest.raises(ValueError, match="val_fraction"):
        data.train_val_split(ids, 1.5)


def test_loader_is_reproducible():
    ids = np.arange(1000)
    batches = [next(iter(data.make_loader(ids, 8, 4, seed=3)))[0] for _ in range(2)]
    torch.testing.assert_close(batches[0], batches[1])
    other = next(iter(data.make_loader(ids, 8, 4, seed=4)))[0]
    assert not torch.equal(batches[0], other)


def _serve(folder, files):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_text_checks_sha256(tmp_path):
    body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    server = _serve(tmp_path, {"input.txt": body})
    try:
        url = f"http://127.0.0.1:{server.server_port}/input.txt"
        good = data.RemoteText(url, hashlib.sha256(body).hexdigest(), "tiny.txt")
        assert data.download_text(good, cache_dir=tmp_path) == body.decode()
        assert (tmp_path / "tiny.txt").read_bytes() == body
        bad = data.RemoteText(url, "0" * 64, "bad.txt")
        with pytest.raises(ValueError, match="sha256"):
            data.download_text(bad, cache_dir=tmp_path)
        assert not (tmp_path / "bad.txt").exists()  # nothing half-written
        missing = data.RemoteText(url.replace("input", "nope"), "0" * 64, "x.txt")
        with pytest.raises(ConnectionError, match="internet"):
            data.download_text(missing, cache_dir=tmp_path)
    finally:
        server.shutdown()
    (tmp_path / "tiny.txt").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="corrupted"):
        data.download_text(good, cache_dir=tmp_path)


def test_encoded_corpus_round_trips():
    from minigpt.tokenizer import get_compact_vocab

    ids = data.encoded("docs_finetune")
    assert get_compact_vocab().decode(ids) == "".join(data.docs_parts()["finetune"])
    with pytest.raises(ValueError, match="name"):
        data.encoded("klingon")
