"""Train the sequential recommender (common.seqrec) with full-softmax cross-entropy.

Every non-padding position of a user's sequence predicts the next item against ALL items (no
sampled negatives), which trains SASRec far better than the original binary loss. Validation is the
leave-one-out protocol's second-to-last item, ranked over the full catalog; training stops early when
validation NDCG@10 stops improving, or at the time budget, and keeps the best epoch's weights.

Data-parallel (training.distributed): the model is wrapped in DistributedDataParallel, each epoch's batches
are dealt to ranks by a DistributedSampler seeded with the seed and the epoch, validation users are split
across ranks and their sums all-reduced, and rank 0's early-stopping and time-budget decisions are broadcast.
Checkpoints: after every epoch rank 0 writes the model, optimiser, best weights and history atomically; a
build started again with the same data and settings resumes after the last finished epoch and, because each
epoch's batches and dropout are seeded from (seed, epoch, rank), ends with the same weights as one that ran
through (the time budget counts the time already spent).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.seqrec import SeqRec, left_pad
from training import checkpoint as ckpt
from training import distributed as D
from training.tracking import NULL, Tracker

log = logging.getLogger(__name__)


@dataclass
class SeqRecConfig:
    dims: int = 64
    max_len: int = 50
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 8  # epochs without validation gain before stopping
    eval_every: int = 2
    max_minutes: float = 15.0
    seed: int = 0
    device: str = "cpu"
    amp_dtype: str = "float32"  # bfloat16/float16 on GPU
    # batch_size is the effective (global) batch: each of N data-parallel ranks takes batch_size // N users a
    # step, so one process and N processes optimise with the same batch and learning rate.


@dataclass
class SeqSplit:
    """Rows are 1..n_items (0 = padding). train[u] is what the model learns from; valid/test targets
    are predicted from their histories (train[u] for valid, train[u] + valid[u] for test)."""

    n_items: int
    train: list[list[int]]
    valid: list[int]  # 0 = no validation target for this user
    test: list[int]  # 0 = none


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """Full-ranking Recall@k / NDCG@k with one target per row (scores over all rows, already masked)."""
    target_scores = scores[np.arange(len(targets)), targets]
    rank = (scores > target_scores[:, None]).sum(1)  # 0-based; ties resolved in the target's favour
    out = {}
    for k in ks:
        hit = rank < k
        out[f"recall@{k}"] = float(hit.mean()) if len(hit) else 0.0
        out[f"ndcg@{k}"] = float((hit / np.log2(rank + 2)).mean()) if len(hit) else 0.0
    return out


@torch.no_grad()
def score_users(model: SeqRec, histories: list[list[int]], exclude_seen: bool) -> np.ndarray:
    """(U, n_items+1) scores, padding column and (optionally) seen items set to -inf."""
    model.eval()
    table = model.table()
    seqs = left_pad(histories, model.encoder.max_len).to(table.device)
    s = (model.encoder.user_vectors(seqs, table) @ table.T).float().cpu().numpy()
    s[:, 0] = -np.inf
    if exclude_seen:
        for i, h in enumerate(histories):
            s[i, h] = -np.inf
    return s


def evaluate_histories(model: SeqRec, histories: list[list[int]], targets: np.ndarray, exclude_seen: bool,
                       ks: tuple[int, ...] = (5, 10, 20), batch: int = 1024) -> dict[str, float]:
    """Full-ranking metrics of the model on (history -> target) pairs, in chunks to bound memory."""
    sums: dict[str, float] = {}
    for start in range(0, len(histories), batch):
        chunk = histories[start:start + batch]
        m = ranking_metrics(score_users(model, chunk, exclude_seen), targets[start:start + batch], ks)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
    return {k: v / max(len(histories), 1) for k, v in sums.items()}



def _batches(train: list[list[int]], users: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    # Bucket users of similar length so a batch pads to its own longest sequence, not to max_len.
    users = [u for u in users if len(train[u]) >= 2]
    rng.shuffle(users)
    users.sort(key=lambda u: min(len(train[u]), 10 ** 6) // 4)
    batches = [users[i:i + batch_size] for i in range(0, len(users), batch_size)]
    rng.shuffle(batches)
    return batches


class NextItemLoss(torch.nn.Module):
    """Full-softmax next-item cross-entropy of a SeqRec, as one forward call (what DDP wraps)."""

    def __init__(self, model: SeqRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.model.table()
        h = self.model.encoder.hidden(inputs, table)
        keep = (targets > 0) & (inputs > 0)
        logits = h[keep] @ table.T  # full softmax over every item
        logits[:, 0] = -1e4
        return F.cross_entropy(logits.float(), targets[keep]), keep.sum()


def _fingerprint(split: SeqSplit, cfg: SeqRecConfig, users: list[int], world: int, init: dict | None) -> str:
    """What a checkpoint must match to be resumed: data, settings (not the time budget), world size, start."""
    h = hashlib.sha256()
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("max_minutes", "device")}
    h.update(repr((sorted(conf.items()), split.n_items, world, len(users))).encode())
    for u in users:
        h.update(np.asarray(split.train[u], np.int32).tobytes() + b"|")
    h.update(np.asarray(split.valid, np.int64).tobytes())
    if init is not None:
        for k in sorted(init):
            h.update(k.encode() + init[k].float().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def train_seqrec(split: SeqSplit, cfg: SeqRecConfig, text: torch.Tensor | None = None,
                 attrs: torch.Tensor | None = None, n_attrs: int = 0,
                 exclude_seen: bool = True, *, train_users: list[int] | None = None,
                 init_state: dict[str, torch.Tensor] | None = None, checkpoint: Path | None = None,
                 tracker: Tracker = NULL, tag: str = "recommender",
                 on_step: Callable[[int, SeqRec, float], None] | None = None) -> tuple[SeqRec, dict]:
    """Train on split.train (only train_users when given); early-stop on split.valid. init_state warm-starts
    from a trained model's state dict (an incremental update); on_step(step, model, loss) is called after
    every optimiser step (tests watch the weights with it). Returns (best model, report)."""
    d = D.current()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = SeqRec(split.n_items, cfg.dims, cfg.max_len, cfg.layers, cfg.heads, cfg.dropout,
                   text=None if text is None else text.to(device), attrs=None if attrs is None else attrs.to(device),
                   n_attrs=n_attrs).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    users = list(range(len(split.train))) if train_users is None else sorted(train_users)
    fingerprint = _fingerprint(split, cfg, users, d.world, init_state)
    per_rank = max(1, cfg.batch_size // d.world)
    step_model: torch.nn.Module = NextItemLoss(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (text vectors, attribute ids) are constant and identical on every rank: synced once at start,
        # not broadcast before every step.
        step_model = DistributedDataParallel(step_model, forward_sync_buffers=False,
                                             device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    val_users = [u for u in range(len(split.train)) if split.valid[u] and split.train[u]]
    mine = val_users[d.rank::d.world]  # each rank scores its share; sums are all-reduced
    val_hist = [split.train[u] for u in mine]
    val_targets = np.array([split.valid[u] for u in mine], dtype=np.int64)
    best, best_state, best_epoch, history, first_epoch, spent = -1.0, None, 0, [], 1, 0.0
    resumed = ckpt.load(checkpoint, fingerprint)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["opt"])
        best, best_epoch, history = resumed["best"], resumed["best_epoch"], resumed["history"]
        best_state, spent, first_epoch = resumed["best_state"], resumed["spent_s"], resumed["epoch"] + 1
        log.info("resumed from %s after epoch %d (%.0fs already spent)", checkpoint, resumed["epoch"], spent)
    started = time.perf_counter() - spent
    deadline = started + 60 * cfg.max_minutes
    stop_reason = "max_epochs"
    samples = steps = 0
    train_s = 0.0
    stop = resumed is not None and resumed.get("stopped")
    if stop:
        stop_reason = resumed["stopped"]
    for epoch in range(first_epoch, cfg.max_epochs + 1) if not stop else ():
        model.train()
        total = count = 0.0
        # Every rank builds the same epoch plan from (seed, epoch); the sampler deals it out.
        batches = _batches(split.train, users, per_rank, random.Random(cfg.seed * 1_000_003 + epoch))
        sampler = torch.utils.data.DistributedSampler(batches, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                      seed=cfg.seed)
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 7919 + epoch * 31 + d.rank)  # dropout: same on a resumed run
        t_epoch = time.perf_counter()
        for i in sampler:
            batch = batches[i]
            seqs = left_pad([split.train[u] for u in batch], cfg.max_len + 1).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, n_tok = step_model(seqs[:, :-1], seqs[:, 1:])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach()) * int(n_tok)
            count += int(n_tok)
            samples += len(batch)
            steps += 1
            if on_step is not None:
                on_step(steps, model, float(loss.detach()))
        train_s += time.perf_counter() - t_epoch
        total, count = D.all_sum([total, count], d)
        entry = {"epoch": epoch, "loss": total / max(count, 1), "seconds": round(time.perf_counter() - started, 1)}
        out_of_time = D.agree(time.perf_counter() > deadline, d)
        tracker.scalar(f"{tag}/train/loss", entry["loss"], epoch)
        tracker.scalar(f"{tag}/train/learning_rate", opt.param_groups[0]["lr"], epoch)
        tracker.scalar(f"{tag}/train/samples_per_s", len(sampler) * per_rank * d.world / max(time.perf_counter() - t_epoch, 1e-9), epoch)
        stopped = ""
        if epoch % cfg.eval_every == 0 or out_of_time:
            m = evaluate_histories(model, val_hist, val_targets, exclude_seen, ks=(10,)) if mine else {}
            sums = D.all_sum([m.get("ndcg@10", 0.0) * len(mine), m.get("recall@10", 0.0) * len(mine), len(mine)], d)
            m = {"ndcg@10": sums[0] / max(sums[2], 1), "recall@10": sums[1] / max(sums[2], 1)}
            entry.update({f"valid_{k}": v for k, v in m.items()})
            tracker.scalars(f"{tag}/valid", m, epoch)
            if D.agree(m["ndcg@10"] > best, d):
                best, best_epoch = m["ndcg@10"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log.info("epoch %d loss %.4f valid ndcg@10 %.4f recall@10 %.4f (%.0fs)", epoch, entry["loss"],
                     m["ndcg@10"], m["recall@10"], entry["seconds"])
            if D.agree(epoch - best_epoch >= cfg.patience, d):
                stopped = "early_stopping"
        history.append(entry)
        if not stopped and out_of_time:
            stopped = "time_budget"
        if d.main and checkpoint is not None:
            ckpt.save(checkpoint, {
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                "best": best, "best_epoch": best_epoch, "best_state": best_state, "history": history,
                "spent_s": time.perf_counter() - started, "stopped": stopped})
        tracker.flush()
        if stopped:
            stop_reason = stopped
            break
    if d.enabled:
        # Drop the DDP wrapper (its reducer holds the process group and pending gloo work) now, not at
        # interpreter exit: gloo threads still alive at finalization abort the process (pytorch#190489).
        del step_model
        gc.collect()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    report = {"config": asdict(cfg), "best_epoch": best_epoch, "valid_ndcg@10": best, "stop": stop_reason,
              "epochs_run": len(history), "seconds": round(time.perf_counter() - started, 1), "history": history,
              "parameters": sum(p.numel() for p in model.parameters()),
              "world_size": d.world, "per_rank_batch": per_rank, "effective_batch_size": per_rank * d.world,
              "learning_rate": cfg.lr, "train_users": len(users), "warm_start": init_state is not None,
              "resumed_after_epoch": None if resumed is None else resumed["epoch"],
              "samples_per_s": round(samples * d.world / train_s, 1) if train_s > 0 else None,
              "steps_per_s": round(steps / train_s, 3) if train_s > 0 else None}
    return model, report
