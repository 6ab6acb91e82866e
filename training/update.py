"""`python -m training update --bundle OLD --events LOG --out NEW`: learn from what was logged since a build.

Reads the feedback events the engine logged after the bundle's data ends (a server's --state-dir or its
events.log, or the fleet's shared Redis stream `redis://HOST:PORT/DB?prefix=P`), appends them to the bundle's
served histories, and warm-starts the recommender from the bundle's own weights: the item table the bundle
serves becomes the trainable id embedding (its text and attribute parts are already folded into it), the
sequence encoder continues from its weights. Training runs on the users the new events touched plus a replay
sample of the others (so what the model knew is not forgotten), early-stopping on each touched user's newest
event. Everything else of the bundle (encoder, indexes, catalog, re-scoring weights) is copied; the new
version records its parent. Runs data-parallel under torchrun like a build.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from common import bundle_format as bf
from common.eventlog import feedback_events
from training import distributed as D
from training.bundle_writer import seal, staged
from training.data import DataError
from training.recbuild import _stats, write_history
from training.recommender import SeqRecConfig, SeqSplit, train_seqrec
from training.tracking import NULL, Tracker

log = logging.getLogger(__name__)


def read_events(source: str) -> list[dict[str, Any]]:
    """Feedback events of a local log (state dir or events.log) or of a fleet's Redis events stream."""
    if source.startswith(("redis://", "rediss://", "unix://")):
        import redis

        prefix = parse_qs(urlsplit(source).query).get("prefix", ["searchrec"])[0]
        url = source.split("?", 1)[0]
        try:
            r = redis.Redis.from_url(url, socket_timeout=30)
            entries = r.xrange(f"{prefix}:events")
        except redis.RedisError as exc:
            raise DataError(f"--events {url}: cannot read the stream {prefix}:events ({exc})") from exc
        out = []
        for _id, fields in entries:
            if fields.get(b"kind", b"feedback") == b"feedback":
                out.extend(json.loads(fields[b"events"]))
        return out
    path = Path(source)
    if not path.exists():
        raise DataError(f"--events {path}: no such state dir or log file")
    return feedback_events(path)


def _since(manifest: dict[str, Any], since: float | None) -> float:
    """Unix seconds after which events are new: --since, else the newest interaction the bundle was built
    from, else the moment the bundle was built."""
    if since is not None:
        return float(since)
    until = manifest["recommender"].get("data_until")
    if until is not None:
        return float(until)
    return datetime.fromisoformat(manifest["created_at"]).timestamp()


def update(bundle: Path, events: str, out: Path, cfg: SeqRecConfig, *, since: float | None = None,
           replay: float = 1.0, checkpoint: Path | None = None, tracker: Tracker = NULL) -> dict[str, Any] | None:
    """Write bundle + the events logged since it into out (rank 0; other ranks train and return None)."""
    started = time.perf_counter()
    d = D.current()
    bundle, out = Path(bundle), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: output directory already exists; choose a new path")
    manifest = bf.read_manifest(bundle)
    spec = manifest.get("recommender")
    if not spec:
        raise DataError(f"{bundle}: this bundle has no recommender to update")
    items = pd.read_parquet(bundle / manifest["items"]["file"])
    n = len(items)
    users = pd.read_parquet(bundle / spec["users"])["user_id"].astype(str).tolist()
    hist = np.load(bundle / spec["history"], allow_pickle=False)
    indptr, flat = hist["indptr"], hist["items"]
    seqs = [flat[indptr[u]:indptr[u + 1]].tolist() for u in range(len(users))]
    times = None
    if "times" in hist.files:
        tf = hist["times"]
        times = [tf[indptr[u]:indptr[u + 1]].tolist() for u in range(len(users))]

    cut = _since(manifest, since)
    logged = read_events(events)
    fresh = sorted((e for e in logged if e.get("timestamp_ms", 0) / 1000.0 > cut), key=lambda e: e["timestamp_ms"])
    row = {str(i): r for r, i in enumerate(items["item_id"])}
    index = {u: i for i, u in enumerate(users)}
    touched: set[int] = set()
    first_new: dict[int, int] = {}
    used = unknown = newest = 0
    for e in fresh:
        r = row.get(str(e.get("item_id", "")))
        if r is None:
            unknown += 1
            continue
        u = index.get(str(e.get("user_id", "")))
        if u is None:
            index[str(e["user_id"])] = u = len(users)
            users.append(str(e["user_id"]))
            seqs.append([])
            if times is not None:
                times.append([])
        first_new.setdefault(u, len(seqs[u]))
        seqs[u].append(r)
        if times is not None:
            times[u].append(int(e["timestamp_ms"]) // 1000)
        touched.add(u)
        used += 1
        newest = max(newest, int(e["timestamp_ms"]) // 1000)
    if not used:
        raise DataError(f"--events {events}: no events for the bundle's items after {datetime.fromtimestamp(cut)} "
                        f"({len(logged)} logged, {len(fresh)} newer, {unknown} for unknown items); nothing to learn")

    # Split: the touched users' newest event validates; everyone's earlier items train. A touched user whose
    # only item is the new one has nothing to learn from and no history to validate with.
    train = [[r + 1 for r in s[:-1]] if u in touched else [r + 1 for r in s] for u, s in enumerate(seqs)]
    valid = [s[-1] + 1 if u in touched and len(s) >= 2 else 0 for u, s in enumerate(seqs)]
    split = SeqSplit(n, train, valid, [0] * len(seqs))
    others = [u for u in range(len(seqs)) if u not in touched and len(seqs[u]) >= 2]
    rng = random.Random(cfg.seed)
    sample = rng.sample(others, min(len(others), int(round(replay * len(touched)))))
    train_users = sorted(touched | set(sample))

    state = load_file(str(bundle / spec["model"]))
    vectors = np.load(bundle / spec["vectors"], allow_pickle=False).astype(np.float32)
    table = torch.zeros(n + 1, vectors.shape[1])
    table[1:] = torch.from_numpy(vectors)
    init = {"item.weight": table, **{k: v.float() for k, v in state.items() if k.startswith("encoder.")}}
    old = spec["config"]
    cfg = SeqRecConfig(**{**asdict(cfg), "dims": spec["dims"], "max_len": spec["max_len"], "layers": spec["layers"],
                          "heads": spec["heads"], "dropout": old.get("dropout", cfg.dropout)})
    model, report = train_seqrec(split, cfg, exclude_seen=not spec.get("allow_repeats", False),
                                 train_users=train_users, init_state=init, checkpoint=checkpoint, tracker=tracker)
    if not d.main:
        return None
    with torch.no_grad():
        new_vectors = model.table().float()[1:].numpy()
    new_state = {f"encoder.{k}": v.contiguous() for k, v in model.encoder.state_dict().items()}
    if "text_proj.weight" in state:  # live items keep their projection into the (moved) item space
        new_state["text_proj.weight"] = state["text_proj.weight"].contiguous()
    with staged(out) as tmp:
        shutil.copytree(bundle, tmp)
        (tmp / bf.MANIFEST).unlink()
        save_file(new_state, str(tmp / spec["model"]))
        np.save(tmp / spec["vectors"], new_vectors.astype(np.float32))
        pd.DataFrame({"user_id": users}).to_parquet(tmp / spec["users"], index=False)
        ip = write_history(tmp / spec["history"], seqs, times)
        np.savez(tmp / spec["stats"], **_stats(seqs, n, times))
        info = {"parent_version": manifest["bundle_version"], "events_source": events, "events_logged": len(logged),
                "events_after_since": len(fresh), "events_used": used, "events_unknown_item": unknown,
                "since": cut, "users_touched": len(touched), "new_users": len(users) - len(indptr) + 1,
                "replay_users": len(sample), "seconds": round(time.perf_counter() - started, 1)}
        spec = {**spec, "training": {k: v for k, v in report.items() if k != "config"}, "config": asdict(cfg),
                "user_count": len(users), "interactions": int(ip[-1]),
                "data_until": max(newest, spec.get("data_until") or 0),
                "world_size": report["world_size"], "effective_batch_size": report["effective_batch_size"],
                "learning_rate": report["learning_rate"], "valid_ndcg_model_only": round(report["valid_ndcg@10"], 5)}
        new_manifest = {**manifest, "recommender": spec, "parent_version": manifest["bundle_version"], "update": info,
                        # The parent's evaluation measured the parent's model: not carried over.
                        "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if k != "recommend"}}
        new_manifest = seal(tmp, new_manifest)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    tracker.manifest(new_manifest)
    return new_manifest
