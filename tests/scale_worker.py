"""A process the data-parallel tests start (under torchrun, or alone): not a test module itself.

    python tests/scale_worker.py steps OUT_DIR            train a tiny recommender; OUT_DIR/rank-R.json holds a
                                                          digest of the weights after every step and the losses
    python tests/scale_worker.py build KILL_AT ARGS...    `python -m training build ARGS`, killed (SIGKILL) at
                                                          optimiser step KILL_AT (0 = never)
    python tests/scale_worker.py index OUT                build an IVF-PQ index with every rank adding a share
    python tests/scale_worker.py classify KILL_AT ARGS... `python -m training ARGS`, killed (SIGKILL) in the
                                                          classifier's epoch KILL_AT
    python tests/scale_worker.py finetune BASE OUT BATCH [KILL_AT]
                                                          fine-tune the tiny encoder at BASE (tiny_encoder) with
                                                          BATCH queries a step (checkpoint OUT/finetune.ckpt),
                                                          killed at step KILL_AT; OUT/rank-R.json as for `steps`
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training import distributed as D  # noqa: E402
from training.recommender import SeqRecConfig, SeqSplit, train_seqrec  # noqa: E402


def tiny_split(users: int = 96, items: int = 40, seed: int = 3) -> SeqSplit:
    """Users walk through items in small steps, so the next item is learnable."""
    rng = random.Random(seed)
    train, valid = [], []
    for _ in range(users):
        at = rng.randrange(items)
        seq = [(at + 2 * k + rng.randrange(2)) % items + 1 for k in range(rng.randrange(6, 14))]
        train.append(seq[:-1])
        valid.append(seq[-1])
    return SeqSplit(items, train, valid, [0] * users)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode() + p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def steps(out: Path) -> None:
    d = D.from_env("cpu")
    seen: list[dict] = []
    cfg = SeqRecConfig(dims=16, max_len=12, layers=1, heads=1, dropout=0.1, batch_size=32, max_epochs=15,
                       eval_every=1, patience=100, lr=1e-2)
    _, report = train_seqrec(tiny_split(), cfg, on_step=lambda s, m, loss: seen.append(
        {"step": s, "digest": digest(m), "loss": loss}))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{d.rank}.json").write_text(json.dumps({
        "steps": seen, "epochs": [h["loss"] for h in report["history"]], "world": d.world,
        "effective_batch_size": report["effective_batch_size"], "per_rank_batch": report["per_rank_batch"]}))
    D.shutdown()


def tiny_encoder(base: Path) -> None:
    """A small BERT without dropout (so one process and two take the very same steps), MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.__main__ import default_encoder_dir

    tok = AutoTokenizer.from_pretrained(default_encoder_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         max_position_embeddings=64)).save_pretrained(base)
    tok.save_pretrained(base)


def tiny_search_data() -> tuple[list[str], list[tuple[str, int]], dict, dict, object]:
    """Items "<colour> <thing> model <n>", queries "<colour> <thing>": texts, pairs, negatives, positives, dev."""
    import numpy as np

    from training.finetune import DevSet

    colours = ["red", "blue", "green", "black", "white", "steel", "oak", "brass"]
    things = ["drill", "hammer", "lamp", "faucet", "ladder", "saw"]
    texts, pairs, positives = [], [], {}
    for c in colours:
        for t in things:
            for n in range(3):
                positives.setdefault(f"{c} {t}", set()).add(len(texts))
                pairs.append((f"{c} {t}", len(texts)))
                texts.append(f"{c} {t} model {n}")
    negatives = {q: [r for r, text in enumerate(texts) if text.split()[1] == q.split()[1] and not text.startswith(q)][:6]
                 for q in positives}
    dev_q = ["red lamp", "oak saw", "blue drill", "brass ladder", "green faucet"]
    grades = {q: {r: 1.0 for r in positives[q]} for q in dev_q}
    return texts, pairs, negatives, positives, DevSet(dev_q, grades, np.arange(len(texts)))


def finetune(base: Path, out: Path, batch: int, kill_at: int = 0) -> None:
    from training.finetune import FinetuneConfig, finetune_encoder

    d = D.from_env("cpu")
    texts, pairs, negatives, positives, dev = tiny_search_data()
    seen: list[dict] = []

    def on_step(step, model, loss):
        seen.append({"step": step, "digest": digest(model), "loss": loss})
        if kill_at and step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: what a crashed machine does

    cfg = FinetuneConfig(batch_size=batch, lr=1e-3, epochs=1, max_steps=8, eval_every=4, patience=100,
                         warmup_steps=2, bf16=False, max_minutes=30)
    out.mkdir(parents=True, exist_ok=True)
    report = finetune_encoder(base, texts, pairs, negatives, positives, dev, out / "encoder", cfg, on_step=on_step,
                              checkpoint=out / "finetune.ckpt")
    (out / f"rank-{d.rank}.json").write_text(json.dumps({"steps": seen, "report": report.as_dict(), "world": d.world}))
    D.shutdown()


def index(out: Path) -> None:
    """Build the ANN index of 5,000 random vectors (above a flat limit of 1,000: IVF-PQ) with every rank adding its
    share; rank 0 writes OUT/index.faiss and OUT/vectors.npy."""
    import faiss
    import numpy as np

    from training.bundle_writer import build_index, index_share

    d = D.from_env("cpu")
    x = np.random.default_rng(7).normal(size=(5000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if d.main:
        built, params = build_index(x, flat_max_items=1000)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(built, str(out / "index.faiss"))
        np.save(out / "vectors.npy", x)
        (out / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "tried"}))
    else:
        index_share(x, flat_max_items=1000)
    D.shutdown()


def classify(kill_at: int, argv: list[str]) -> int:
    """`python -m training ARGV` (a classifier build), SIGKILLed when the classifier's epoch KILL_AT has trained
    (before its checkpoint is written); 0 = never."""
    import training.classifier_build as cb
    from training.__main__ import main

    real, epochs = cb.dev_accuracy, [0]

    def killing(*args, **kwargs):
        epochs[0] += 1
        if kill_at and epochs[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    cb.dev_accuracy = killing
    return main(argv)


def build(kill_at: int, argv: list[str]) -> int:
    import training.recbuild as recbuild
    from training.__main__ import main

    real = recbuild.train_seqrec

    def killing(*args, **kwargs):
        def on_step(step, model, loss):
            if kill_at and step >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: what a crashed machine does
        return real(*args, **kwargs, on_step=on_step)

    recbuild.train_seqrec = killing
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps(Path(sys.argv[2]))
    elif sys.argv[1] == "finetune":
        finetune(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif sys.argv[1] == "tiny-encoder":
        tiny_encoder(Path(sys.argv[2]))
    elif sys.argv[1] == "index":
        index(Path(sys.argv[2]))
    elif sys.argv[1] == "classify":
        sys.exit(classify(int(sys.argv[2]), sys.argv[3:]))
    elif sys.argv[1] == "build":
        sys.exit(build(int(sys.argv[2]), sys.argv[3:]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
