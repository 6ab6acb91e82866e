"""The encoder's start-up shortcuts keep its output: the direct tokenizer gives transformers' ids, and a
cached TorchScript graph gives the traced model's vectors -- or is refused and traced again."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

TEXTS = ["cordless drill", "", " ", "Ünïcödé café naïve", "日本語のテキスト", "emoji 🔨🪛 drill", "a" * 3000,
         "tile " * 300, "\t\n x \u200b y", "O'Reilly's 1/2-in. x 3/4\" #10 @ $5.99", "DEWALT 20V MAX XR Brushless"]
QUERIES = ["cordless drill", "white kitchen sink faucet with sprayer", "x", "tile " * 200]


@pytest.fixture(scope="module")
def encoder_dir():
    from training.__main__ import default_encoder_dir

    return default_encoder_dir()


@pytest.mark.parametrize("max_length", [128, 8])
def test_direct_tokenizer_gives_transformers_ids(encoder_dir, max_length):
    from transformers import AutoTokenizer

    from common.encoding import load_tokenizer

    hf = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    ours = load_tokenizer(encoder_dir, max_length)
    for chunk in ([t] for t in TEXTS), [TEXTS[:4], TEXTS[4:], TEXTS]:
        for texts in chunk:
            want = hf(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            got = ours.encode_batch(texts)
            np.testing.assert_array_equal(np.array([e.ids for e in got]), want["input_ids"])
            np.testing.assert_array_equal(np.array([e.attention_mask for e in got]), want["attention_mask"])


def test_without_tokenizer_json_the_encoder_uses_transformers_tokenizer(encoder_dir, tmp_path):
    import shutil

    from common.encoding import TextEncoder

    slow = tmp_path / "enc"
    shutil.copytree(encoder_dir, slow)
    (slow / "tokenizer.json").unlink()
    enc = TextEncoder(slow, device="cpu", dtype="float32")
    assert type(enc.tokenizer).__module__.startswith("transformers")
    np.testing.assert_allclose(enc.encode(QUERIES), TextEncoder(encoder_dir).encode(QUERIES), atol=1e-5)


def test_cached_graph_gives_the_traced_vectors_without_loading_the_model(encoder_dir, tmp_path):
    from common.encoding import TextEncoder

    first = TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    assert first.graph_source == "traced" and len(list(tmp_path.glob("encoder-*.pt"))) == 1
    again = TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    assert again.graph_source == "cache" and again._model is None  # no model code ran
    np.testing.assert_array_equal(again.encode(QUERIES, batch_size=3), first.encode(QUERIES, batch_size=3))
    np.testing.assert_allclose(again.encode(QUERIES), TextEncoder(encoder_dir).encode(QUERIES), atol=1e-5)
    # Another precision or other weights are other graphs, never this one.
    assert TextEncoder(encoder_dir, dtype="int8", trace=True, graph_cache=tmp_path).graph_source == "traced"
    other = TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests={"config.json": "0", "model.safetensors": "1"})
    assert other.graph_source == "traced" and len(list(tmp_path.glob("encoder-*.pt"))) == 3
    int8 = TextEncoder(encoder_dir, dtype="int8", trace=True, graph_cache=tmp_path)
    assert int8.graph_source == "cache"
    np.testing.assert_allclose(int8.encode(QUERIES), TextEncoder(encoder_dir, dtype="int8").encode(QUERIES), atol=1e-5)


def test_a_bf16_graph_is_cached_and_gives_the_bf16_model_vectors(encoder_dir, tmp_path):
    # bfloat16 asked for explicitly: traced and cached on any CPU kind (emulated where bf16 is not native).
    from common.encoding import TextEncoder

    first = TextEncoder(encoder_dir, dtype="bfloat16", trace=True, graph_cache=tmp_path)
    again = TextEncoder(encoder_dir, dtype="bfloat16", trace=True, graph_cache=tmp_path)
    assert (first.graph_source, again.graph_source) == ("traced", "cache") and again._model is None
    np.testing.assert_array_equal(again.encode(QUERIES), first.encode(QUERIES))
    np.testing.assert_allclose(again.encode(QUERIES), TextEncoder(encoder_dir, dtype="bfloat16").encode(QUERIES), atol=1e-5)
    # An fp32 graph of the same weights is another file.
    assert TextEncoder(encoder_dir, dtype="float32", trace=True, graph_cache=tmp_path).graph_source == "traced"
    assert len(list(tmp_path.glob("encoder-*.pt"))) == 2


def test_a_broken_or_foreign_graph_is_refused_and_traced_again(encoder_dir, tmp_path, caplog):
    import torch

    from common.encoding import TextEncoder

    TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    (path,) = tmp_path.glob("encoder-*.pt")
    want = TextEncoder(encoder_dir).encode(QUERIES)

    path.write_bytes(path.read_bytes()[: 1 << 20])  # cut short
    with caplog.at_level(logging.WARNING, logger="common.encoding"):
        enc = TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    assert enc.graph_source == "traced" and "is unusable" in caplog.text
    np.testing.assert_allclose(enc.encode(QUERIES), want, atol=1e-5)
    assert TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path).graph_source == "cache"  # rewritten whole

    # A loadable graph that does not compute this model's vectors: its probe check fails.
    class Zero(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.ones(input_ids.shape[0], input_ids.shape[1], 384)

    torch.jit.save(torch.jit.script(Zero()), str(path), _extra_files={"searchrec.json": '{"probe": [[0.5]]}'})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.encoding"):
        enc = TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    assert enc.graph_source == "traced" and "probe vectors differ" in caplog.text
    np.testing.assert_allclose(enc.encode(QUERIES), want, atol=1e-5)


def test_an_unwritable_cache_costs_a_trace_not_the_start(encoder_dir, tmp_path, caplog):
    from common.encoding import TextEncoder

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    with caplog.at_level(logging.WARNING, logger="common.encoding"):
        enc = TextEncoder(encoder_dir, trace=True, graph_cache=blocked / "cache")
    assert enc.graph_source == "traced" and "not cached" in caplog.text
    assert enc.encode(["drill"]).shape == (1, 384)


def test_the_cache_keeps_the_most_recently_used_graphs(encoder_dir, tmp_path, monkeypatch):
    import common.encoding as ce

    monkeypatch.setattr(ce, "GRAPH_CACHE_KEEP", 2)
    digests = [{"config.json": str(i), "model.safetensors": "w"} for i in range(3)]
    ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[0])
    ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[1])
    os.utime(next(tmp_path.glob("encoder-*.pt")), (1, 1))  # the oldest in use
    assert ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[0]).graph_source == "cache"
    ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[2])
    assert len(list(tmp_path.glob("encoder-*.pt"))) == 2
    # digests[0] was used after digests[1], so digests[1]'s graph went.
    assert ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[0]).graph_source == "cache"
    assert ce.TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path, digests=digests[1]).graph_source == "traced"


def test_a_cached_graph_is_served_without_importing_transformers(encoder_dir, tmp_path):
    from common.encoding import TextEncoder

    TextEncoder(encoder_dir, trace=True, graph_cache=tmp_path)
    code = ("import sys; from common.encoding import TextEncoder; "
            f"e = TextEncoder({str(encoder_dir)!r}, trace=True, graph_cache={str(tmp_path)!r}); "
            "v = e.encode(['cordless drill']); "
            "print(e.graph_source, 'transformers' in sys.modules, v.shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["cache", "False"]
