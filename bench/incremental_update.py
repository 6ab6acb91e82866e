"""Incremental update vs full retrain vs no update, by time slices, in one run.

For each dataset: train a bundle on the first 80% of time, then (a) `training update` it with the events of
the next 10% written to a real engine event log, (b) retrain from scratch on the first 90%, (c) leave it.
All three are scored on the last 10%: each user with interactions there is given everything before the 90%
mark as history (the no-update bundle sees those items too, as the live server would through Feedback) and
must rank the items they then interacted with (Recall@20 / NDCG@20 over the full catalog, the model's own
scores, seen items excluded unless the data re-buys). Wall times are measured around each step.

Online Retail has invoice times: the 80% / 90% marks are quantiles of all interaction times. Amazon Beauty has
no times at all (its file is each user's items in order), so its "time" is the position within each user's
sequence: a user's first 80% of items train, the next 10% update, the last 10% test (stated in the output).

    python bench/incremental_update.py --json out/incremental.json [--datasets beauty online_retail]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.eventlog import EventLog  # noqa: E402
from common.seqrec import SeqEncoder, left_pad  # noqa: E402
from training.__main__ import default_encoder_dir  # noqa: E402
from training.behaviour import Behaviour, load_beauty, prepare_online_retail  # noqa: E402
from training.bundle_writer import BuildOptions  # noqa: E402
from training.recommender import SeqRecConfig  # noqa: E402
from training.recpipeline import BehaviourInput, build  # noqa: E402
from training.update import update  # noqa: E402

K = 20


def _times(b: Behaviour, name: str) -> list[list[float]]:
    if b.times is not None:
        return [[float(t) for t in ts] for ts in b.times]
    # Position within the user's sequence, in (0, 1]: the only order Beauty has.
    return [[(i + 1) / len(s) for i in range(len(s))] for s in b.sequences]


def _cut(b: Behaviour, times: list[list[float]], until: float) -> Behaviour:
    out = copy.copy(b)
    out.report = copy.deepcopy(b.report)
    keep = [[r for r, t in zip(s, ts) if t <= until] for s, ts in zip(b.sequences, times)]
    kt = [[t for t in ts if t <= until] for ts in times]
    users = [i for i, s in enumerate(keep) if s]
    out.users = [b.users[i] for i in users]
    out.sequences = [keep[i] for i in users]
    out.times = None if b.times is None else [[int(t) for t in kt[i]] for i in users]
    return out


def _score(bundle: Path, histories: list[list[int]], targets: list[set[int]], exclude_seen: bool) -> dict[str, float]:
    m = json.loads((bundle / "manifest.json").read_text())["recommender"]
    state = load_file(str(bundle / m["model"]))
    enc = SeqEncoder(m["dims"], m["max_len"], m["layers"], m["heads"], 0.0)
    enc.load_state_dict({k.removeprefix("encoder."): v.float() for k, v in state.items() if k.startswith("encoder.")})
    enc.eval()
    vec = torch.from_numpy(np.load(bundle / m["vectors"]).astype(np.float32))
    table = torch.cat([torch.zeros(1, vec.shape[1]), vec])
    recall = ndcg = 0.0
    with torch.no_grad():
        for s in range(0, len(histories), 512):
            hs = histories[s:s + 512]
            uv = enc.user_vectors(left_pad([[r + 1 for r in h] for h in hs], m["max_len"]), table)
            sc = (uv @ vec.T).numpy()
            for i, h in enumerate(hs):
                if exclude_seen:
                    sc[i, h] = -np.inf
                top = np.argpartition(-sc[i], K)[:K]
                top = top[np.argsort(-sc[i, top])]
                rel = targets[s + i]
                gains = np.array([1.0 if t in rel else 0.0 for t in top])
                recall += gains.sum() / min(len(rel), K)
                ndcg += (gains / np.log2(np.arange(2, K + 2))).sum() / (1 / np.log2(np.arange(2, min(len(rel), K) + 2))).sum()
    n = max(len(histories), 1)
    return {f"recall@{K}": recall / n, f"ndcg@{K}": ndcg / n, "users": len(histories)}


def run_dataset(name: str, data_dir: Path, work: Path, minutes: float, update_minutes: float, seed: int) -> dict:
    b = load_beauty(data_dir) if name == "beauty" else prepare_online_retail(data_dir)
    times = _times(b, name)
    if b.times is not None:
        flat = np.concatenate([np.asarray(t) for t in times if t])
        t80, t90 = float(np.quantile(flat, 0.8)), float(np.quantile(flat, 0.9))
        clock = "invoice time (quantiles of all interactions)"
    else:
        t80, t90 = 0.8, 0.9
        clock = "position within each user's sequence (the data has no times)"
    use_text = name == "online_retail"
    opts = lambda tag: BuildOptions(encoder_dir=default_encoder_dir(), name=f"{name}-{tag}")  # noqa: E731
    cfg = SeqRecConfig(max_minutes=minutes, seed=seed, max_epochs=200)
    res: dict = {"clock": clock, "cut_80": t80, "cut_90": t90}

    def timed_build(tag: str, until: float) -> tuple[Path, float, dict]:
        bb = _cut(b, times, until)
        out = work / f"{name}-{tag}"
        t0 = time.perf_counter()
        man = build(BehaviourInput(bb, "all", None, name, use_text, {}), out, opts(tag), cfg, False, "cpu")
        return out, time.perf_counter() - t0, man

    base, base_s, base_m = timed_build("base80", t80)
    full, full_s, full_m = timed_build("full90", t90)
    # The update slice as the engine would have logged it (one Feedback record per user and day).
    state = work / f"{name}-state"
    log = EventLog(state, fsync=False)
    scale = 1000.0 if b.times is not None else 1e9  # Beauty's positions become milliseconds of a pseudo clock
    n_events = 0
    for u, (s, ts) in enumerate(zip(b.sequences, times)):
        evs = [{"event_id": f"{u}-{i}", "user_id": b.users[u], "item_id": str(b.items["item_id"].iloc[r]), "type": 4,
                "timestamp_ms": int(round(t * scale)), "query": "", "position": 0}
               for i, (r, t) in enumerate(zip(s, ts)) if t80 < t <= t90]
        if evs:
            log.append({"kind": "feedback", "events": evs})
            n_events += len(evs)
    log.close()
    upd = work / f"{name}-updated"
    ucfg = SeqRecConfig(lr=1e-3, max_epochs=20, max_minutes=update_minutes, eval_every=1, patience=3, seed=seed)
    t0 = time.perf_counter()
    upd_m = update(base, str(state), upd, ucfg, since=t80 * scale / 1000.0)
    upd_s = time.perf_counter() - t0

    # Test: users with interactions after the 90% mark and some history before it.
    hist, targ = [], []
    for s, ts in zip(b.sequences, times):
        h = [r for r, t in zip(s, ts) if t <= t90]
        after = {r for r, t in zip(s, ts) if t > t90}
        allow = base_m["recommender"]["allow_repeats"]
        if not allow:
            after -= set(h)
        if h and after:
            hist.append(h)
            targ.append(after)
    exclude = not base_m["recommender"]["allow_repeats"]
    res["test_users"] = len(hist)
    res["update_events"] = n_events
    for label, bundle, secs, man in (("no_update", base, 0.0, base_m), ("update", upd, upd_s, upd_m),
                                      ("full_retrain", full, full_s, full_m)):
        tr = man["recommender"]["training"]
        res[label] = {**_score(bundle, hist, targ, exclude), "wall_s": round(secs, 1),
                      "train_s": tr["seconds"], "epochs": tr["epochs_run"], "stop": tr["stop"]}
        print(f"{name:<14} {label:<13} recall@{K} {res[label][f'recall@{K}']:.4f} ndcg@{K} "
              f"{res[label][f'ndcg@{K}']:.4f}  wall {secs:7.1f}s  train {tr['seconds']:6.1f}s  "
              f"{tr['epochs_run']} epochs ({tr['stop']})", flush=True)
    res["base_wall_s"] = round(base_s, 1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--datasets", nargs="+", default=["beauty", "online_retail"])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget of the base and full builds")
    ap.add_argument("--update-minutes", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = {"machine": f"{torch.get_num_threads()} threads", "k": K, "budget_min": args.minutes,
           "update_budget_min": args.update_minutes}
    with tempfile.TemporaryDirectory(prefix="incr-") as tmp:
        for name in args.datasets:
            out[name] = run_dataset(name, args.data_dir, Path(tmp), args.minutes, args.update_minutes, args.seed)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
            shutil.rmtree(Path(tmp), ignore_errors=True)
            Path(tmp).mkdir(exist_ok=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
