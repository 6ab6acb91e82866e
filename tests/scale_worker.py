"""A process the data-parallel tests start (under torchrun, or alone): not a test module itself.

    python tests/scale_worker.py steps OUT_DIR            train a tiny recommender; OUT_DIR/rank-R.json holds a
                                                          digest of the weights after every step and the losses
    python tests/scale_worker.py build KILL_AT ARGS...    `python -m training build ARGS`, killed (SIGKILL) at
                                                          optimiser step KILL_AT (0 = never)
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
    elif sys.argv[1] == "build":
        sys.exit(build(int(sys.argv[2]), sys.argv[3:]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
