"""Train the sequential recommender (common.seqrec) with full-softmax cross-entropy.

Every non-padding position of a user's sequence predicts the next item against ALL items (no
sampled negatives), which trains SASRec far better than the original binary loss. Validation is the
leave-one-out protocol's second-to-last item, ranked over the full catalog; training stops early when
validation NDCG@10 stops improving, or at the time budget, and keeps the best epoch's weights.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.seqrec import SeqRec, left_pad

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


def _batches(train: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    # Bucket users of similar length so a batch pads to its own longest sequence, not to max_len.
    users = [u for u, s in enumerate(train) if len(s) >= 2]
    rng.shuffle(users)
    users.sort(key=lambda u: min(len(train[u]), 10 ** 6) // 4)
    batches = [users[i:i + batch_size] for i in range(0, len(users), batch_size)]
    rng.shuffle(batches)
    return batches


def train_seqrec(split: SeqSplit, cfg: SeqRecConfig, text: torch.Tensor | None = None,
                 attrs: torch.Tensor | None = None, n_attrs: int = 0,
                 exclude_seen: bool = True) -> tuple[SeqRec, dict]:
    """Train on split.train; early-stop on split.valid. Returns (best model, report)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = torch.device(cfg.device)
    model = SeqRec(split.n_items, cfg.dims, cfg.max_len, cfg.layers, cfg.heads, cfg.dropout,
                   text=None if text is None else text.to(device), attrs=None if attrs is None else attrs.to(device),
                   n_attrs=n_attrs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    val_users = [u for u in range(len(split.train)) if split.valid[u] and split.train[u]]
    val_hist = [split.train[u] for u in val_users]
    val_targets = np.array([split.valid[u] for u in val_users])
    best, best_state, best_epoch, history = -1.0, None, 0, []
    started = time.perf_counter()
    deadline = started + 60 * cfg.max_minutes
    stop_reason = "max_epochs"
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        total, count = 0.0, 0
        for users in _batches(split.train, cfg.batch_size, rng):
            seqs = left_pad([split.train[u] for u in users], cfg.max_len + 1).to(device)
            inputs, targets = seqs[:, :-1], seqs[:, 1:]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                table = model.table()
                h = model.encoder.hidden(inputs, table)
                keep = (targets > 0) & (inputs > 0)
                logits = h[keep] @ table.T  # full softmax over every item
                logits[:, 0] = -1e4
                loss = F.cross_entropy(logits.float(), targets[keep])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach()) * int(keep.sum())
            count += int(keep.sum())
        entry = {"epoch": epoch, "loss": total / max(count, 1), "seconds": round(time.perf_counter() - started, 1)}
        if epoch % cfg.eval_every == 0 or time.perf_counter() > deadline:
            m = evaluate_histories(model, val_hist, val_targets, exclude_seen, ks=(10,))
            entry.update({f"valid_{k}": v for k, v in m.items()})
            if m["ndcg@10"] > best:
                best, best_epoch = m["ndcg@10"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log.info("epoch %d loss %.4f valid ndcg@10 %.4f recall@10 %.4f (%.0fs)", epoch, entry["loss"],
                     m["ndcg@10"], m["recall@10"], entry["seconds"])
            if epoch - best_epoch >= cfg.patience:
                stop_reason = "early_stopping"
                history.append(entry)
                break
        history.append(entry)
        if time.perf_counter() > deadline:
            stop_reason = "time_budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    report = {"config": asdict(cfg), "best_epoch": best_epoch, "valid_ndcg@10": best, "stop": stop_reason,
              "epochs_run": len(history), "seconds": round(time.perf_counter() - started, 1), "history": history,
              "parameters": sum(p.numel() for p in model.parameters())}
    return model, report
