"""Contrastive fine-tuning of the two-tower text encoder (one shared MiniLM for queries and items).

Objective: InfoNCE over in-batch negatives plus one hard negative per query (scale 20, i.e. the
sentence-transformers MultipleNegativesRankingLoss), with known positives of a query masked out of
its negatives. Positives come from judgments (relevance >= 2.33) or behaviour logs; hard negatives
are judged-irrelevant items first, then items BM25 and the current model rank high that nobody
judged relevant. Early stopping on nDCG@10 of held-out queries over a candidate pool. Full
fine-tuning or LoRA (peft, merged into the weights before saving, so the bundle holds a plain model).

Data-parallel under torchrun (training.distributed): each step's batch of `batch_size` queries is split across
the ranks; each rank encodes its queries and their items, the vectors are gathered, and every rank computes the
loss over the whole batch (all ranks' items are negatives of every query, as in one process); each rank
back-propagates through its own vectors and DistributedDataParallel averages the gradients, so N processes take
the step one process would take on the same batch. Decisions (time budget, early stopping) are rank 0's.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from common.cpu import cpu_supports_bf16
from training import checkpoint as ckpt
from training import distributed as D
from training.metrics import ndcg_at

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | lora
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None  # default: 3e-5 full, 5e-4 lora
    max_minutes: float = 9.0
    max_steps: int | None = None
    eval_every: int = 100
    patience: int = 2
    query_max_length: int = 32
    item_max_length: int = 64
    scale: float = 20.0
    seed: int = 0
    freeze_layers: int = 0  # full method: embeddings and this many bottom layers stay frozen (faster steps)
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_steps: int = 20
    item_chunks: int = 2  # items of a step are encoded in this many length-sorted groups (less padding)
    # CPU: bf16 autocast (fp32 master weights). None = where the CPU has native bf16; the CLI sets it from
    # the build's resolved --dtype, so `--dtype float32` trains in fp32 on any CPU. CUDA always autocasts.
    bf16: bool | None = None


@dataclass
class DevSet:
    """Held-out queries with graded judgments, ranked within a pool of item rows."""

    queries: list[str]
    grades: dict[str, dict[int, float]]  # query -> row -> gain (relevance - 1)
    pool: np.ndarray


@dataclass
class FinetuneReport:
    method: str
    steps: int = 0
    pairs: int = 0
    seconds: float = 0.0
    best_step: int = 0
    dev_ndcg_start: float = 0.0
    dev_ndcg_best: float = 0.0
    history: list = field(default_factory=list)
    precision: str = "float32"
    trainable_params: int = 0
    stopped: str = ""
    world_size: int = 1  # processes that trained (data-parallel)
    per_rank_batch: int = 0
    effective_batch: int = 0  # queries per optimiser step over all processes (batch_size rounded down to world)
    lr: float = 0.0
    resumed_at: int = 0  # the step a checkpoint restored (0: trained from the start)

    def as_dict(self) -> dict:
        return asdict(self)


def _pool(model, batch, normalize=True):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1) if normalize else pooled


def sorted_chunks(tokenizer, texts: list[str], max_length: int, chunks: int, device: str) -> tuple[list, torch.Tensor]:
    """texts tokenized in `chunks` groups of similar length, and the permutation that puts the groups' vectors
    back in the texts' order.

    A title batch padded to its longest member is about twice the real tokens; in-batch negatives do
    not care how the item vectors were computed, so encoding them in length-sorted groups gives the
    same loss for less work (measured here: 1.8 s instead of 3.0 s per step of 32 queries)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches, placed = [], []
    for k in range(max(1, chunks)):
        idx = order[k * len(texts) // max(1, chunks):(k + 1) * len(texts) // max(1, chunks)]
        if idx:
            batches.append(tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt").to(device))
            placed.extend(idx)
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[torch.tensor(placed, dtype=torch.long)] = torch.arange(len(texts))
    return batches, inverse.to(device)


class PairEncoder(torch.nn.Module):
    """A step's queries and item passages through the one shared encoder in a single call: DistributedDataParallel
    expects one forward per backward, and the step encodes the queries and each length group of items."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries: dict, item_batches: list, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qv = _pool(self.model, queries)
        dv = torch.cat([_pool(self.model, b) for b in item_batches])[inverse]
        return qv, dv


def step_rows(batch: list[tuple[str, int]], neg_rows: list[int], world: int) -> tuple[list[str], list[int], list[int]]:
    """The whole step's queries, the item rows as gathered from the ranks (rank k's positives then its negatives,
    rank after rank) and the column of each query's positive: the same layout on every rank and, with one rank,
    the one-process layout (all positives, then all negatives)."""
    n = len(batch) // world
    queries, rows, labels = [], [], []
    for k in range(world):
        part = batch[k * n:(k + 1) * n]
        base = len(rows)
        queries += [q for q, _ in part]
        labels += [base + i for i in range(len(part))]
        rows += [r for _, r in part] + neg_rows[k * n:(k + 1) * n]
    return queries, rows, labels


def make_batches(pairs: list[tuple[str, int]], batch_size: int, rng: random.Random) -> list[list[tuple[str, int]]]:
    """Shuffle (query, positive) pairs into batches in which no query appears twice."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    batches: list[list] = []
    open_batches: list[tuple[set, list]] = []
    for q, row in pairs:
        for seen, batch in open_batches:
            if q not in seen:
                seen.add(q)
                batch.append((q, row))
                if len(batch) == batch_size:
                    batches.append(batch)
                    open_batches.remove((seen, batch))
                break
        else:
            open_batches.append(({q}, [(q, row)]))
        if len(open_batches) > 8:  # keep the search short; leftovers become small batches
            batches.append(open_batches.pop(0)[1])
    batches.extend(b for _, b in open_batches if len(b) > 1)
    rng.shuffle(batches)
    return batches


def dev_ndcg(model, tokenizer, texts: list[str], dev: DevSet, cfg: FinetuneConfig, device: str) -> float:
    """nDCG@10 of the dev queries over the dev pool; data-parallel, each rank encodes its share of both."""
    model.eval()
    with torch.inference_mode():
        def enc(strings, max_len):
            part = D.shard_range(len(strings))
            return D.gather_rows(enc_local(strings[part.start:part.stop], max_len))

        def enc_local(strings, max_len):
            order = np.argsort([len(s) for s in strings])
            vecs = [None] * len(strings)
            for i in range(0, len(strings), 128):
                idx = order[i : i + 128]
                batch = tokenizer([strings[j] for j in idx], padding=True, truncation=True, max_length=max_len,
                                  return_tensors="pt").to(device)
                v = _pool(model, batch).cpu().numpy()
                for j, row in zip(idx, v):
                    vecs[j] = row
            return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, model.config.hidden_size), np.float32)
        pool_vecs = enc([texts[r] for r in dev.pool], cfg.item_max_length)
        q_vecs = enc(dev.queries, cfg.query_max_length)
    scores = q_vecs @ pool_vecs.T
    result = []
    for qi, q in enumerate(dev.queries):
        top = np.argsort(-scores[qi])[:10]
        result.append(ndcg_at([int(dev.pool[t]) for t in top], dev.grades[q], 10))
    model.train()
    return D.agree(float(np.mean(result)))  # computed alike on every rank; rank 0's decides


def finetune_encoder(base_dir: Path, texts: list[str], pairs: list[tuple[str, int]],
                     hard_negatives: dict[str, list[int]], positives: dict[str, set[int]], dev: DevSet,
                     out_dir: Path, cfg: FinetuneConfig, device: str = "cpu", progress=None,
                     tracker=None, on_step=None, checkpoint: Path | None = None) -> FinetuneReport:
    """Fine-tune the encoder at base_dir on (query, item row) pairs; saves the best model to out_dir.

    Data-parallel when the process group is joined (training.distributed): every rank calls this with the same
    arguments; rank 0 alone saves. on_step(step, model, loss) is called after every optimiser step.
    checkpoint: a file rank 0 writes after every dev evaluation and a later call with the same settings and data
    resumes from (removed once the encoder is saved)."""
    d = D.current()
    if cfg.batch_size < d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} processes: each needs a query")
    per_rank = cfg.batch_size // d.world
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same stream on every rank: the same batches and negatives everywhere
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModel.from_pretrained(base_dir, local_files_only=True).to(device)
    report = FinetuneReport(method=cfg.method, pairs=len(pairs))
    if getattr(model, "pooler", None) is not None:
        # Mean pooling never reads the pooler: it gets no gradient, and DistributedDataParallel waits for a gradient
        # from every trainable parameter.
        model.pooler.requires_grad_(False)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        # The transformer layers' projections; not the pooler's (mean pooling never reads it, so an adapter there
        # would get no gradient).
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.05,
                                                 target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)"))
        lr = cfg.lr or 5e-4
    elif cfg.method == "full":
        lr = cfg.lr or 3e-5
        if cfg.freeze_layers > 0:
            # Gradients then stop below the first trainable layer: the backward pass gets shorter.
            for module in [model.embeddings, *model.encoder.layer[: cfg.freeze_layers]]:
                for p in module.parameters():
                    p.requires_grad_(False)
    else:
        raise ValueError(f"method must be 'full' or 'lora', got {cfg.method!r}")
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.world_size, report.per_rank_batch, report.effective_batch, report.lr = d.world, per_rank, per_rank * d.world, lr
    use_bf16 = device == "cpu" and (cpu_supports_bf16() if cfg.bf16 is None else cfg.bf16)
    report.precision = "bfloat16 autocast" if use_bf16 or device.startswith("cuda") else "float32"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    # Every batch holds per_rank queries per rank (leftover pairs that would leave a rank short are dropped).
    batches = [b[: len(b) // d.world * d.world] for _ in range(cfg.epochs)
               for b in make_batches(pairs, per_rank * d.world, rng)]
    batches = [b for b in batches if b]
    total = len(batches) if cfg.max_steps is None else min(cfg.max_steps, len(batches))
    budget_s = max(cfg.max_minutes * 60, 1e-6)
    clock = {"elapsed": 0.0}  # rank 0's clock, agreed each step: the schedule must not differ between ranks

    def lr_factor(s: int) -> float:
        # Linear warm-up, then linear decay to zero at whichever comes first: the last batch or the
        # end of the time budget (on a slow CPU the budget ends long before the epoch does, and a
        # schedule that only counted steps would stop with the learning rate still high).
        done = max(s / max(total, 1), clock["elapsed"] / budget_s)
        return min(1.0, (s + 1) / cfg.warmup_steps) * max(0.0, 1 - done)

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    fingerprint = _fingerprint(cfg, d.world, len(texts), pairs)
    # Rank 0's weights reach the other ranks when DistributedDataParallel wraps the model; only rank 0 saves the best.
    resumed = ckpt.load(checkpoint, fingerprint, local=("model", "best_state")) if checkpoint else None
    if resumed is not None:
        if d.main:
            model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["sched"])
        rng.setstate(resumed["rng"])
    net: torch.nn.Module = PairEncoder(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # (Wrapping copies rank 0's weights to the other ranks: a resumed model reaches them here.)
        net = DistributedDataParallel(net, device_ids=[d.local_rank] if device.startswith("cuda") else None,
                                      forward_sync_buffers=False)  # the buffers are constants (position ids)
        torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # dropout: each rank its own masks
    first = 0
    if resumed is not None:
        first, best, best_state, bad_evals = resumed["step"], resumed["best"], resumed.get("best_state"), resumed["bad_evals"]
        report.history, report.best_step = [tuple(h) for h in resumed["history"]], resumed["best_step"]
        report.dev_ndcg_start, clock["elapsed"] = resumed["dev_ndcg_start"], resumed["elapsed"]
        torch.set_rng_state(resumed["torch_rng"][d.rank])
        report.resumed_at = first
        log.info("fine-tuning resumes after step %d (checkpoint %s)", first, checkpoint)
    started = time.perf_counter() - clock["elapsed"]  # the time budget counts the time already spent
    if resumed is None:
        best = dev_ndcg(model, tokenizer, texts, dev, cfg, device) if dev.queries else 0.0
        if tracker is not None and dev.queries:
            tracker.scalar("encoder/valid/dev_ndcg@10", best, 0)
        report.dev_ndcg_start = best
        report.history.append((0, best))
        best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        bad_evals = 0
    net.train()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16))
    step = 0
    for step, batch in enumerate(batches[:total], start=1):
        if step <= first:  # done before the checkpoint (the rng state restored includes its draws)
            continue
        neg_rows = []
        for q, r in batch:  # drawn for the whole batch on every rank: the rng streams stay in step
            cands = [n for n in hard_negatives.get(q, []) if n not in positives.get(q, ())]
            neg_rows.append(rng.choice(cands) if cands else rng.randrange(len(texts)))
        queries, doc_rows, labels = step_rows(batch, neg_rows, d.world)
        n = len(batch) // d.world
        mine_q = queries[d.rank * n:(d.rank + 1) * n]
        mine_docs = doc_rows[d.rank * 2 * n:(d.rank + 1) * 2 * n]
        qb = tokenizer(mine_q, padding=True, truncation=True, max_length=cfg.query_max_length,
                       return_tensors="pt").to(device)
        item_batches, inverse = sorted_chunks(tokenizer, [texts[r] for r in mine_docs], cfg.item_max_length,
                                              cfg.item_chunks, device)
        with autocast:
            qv, dv = net(qb, item_batches, inverse)
        qv, dv = D.gather_with_grad(qv), D.gather_with_grad(dv)
        logits = cfg.scale * qv @ dv.T
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for i, q in enumerate(queries):  # another query's positive may be a positive of this one too
            known = positives.get(q, ())
            for j, r in enumerate(doc_rows):
                if j != labels[i] and r in known:
                    mask[i, j] = True
        logits = logits.masked_fill(mask, -1e4)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=logits.device))
        # Every rank holds the whole batch's loss but back-propagates through its own vectors only; the average
        # that DistributedDataParallel takes over ranks is then 1/world of the one-process gradient.
        (loss * d.world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        clock["elapsed"] = D.agree(time.perf_counter() - started)
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if on_step is not None:
            on_step(step, model, loss_value)
        if progress is not None:
            progress(1, loss_value)
        if tracker is not None:
            tracker.scalar("encoder/train/loss", loss_value, step)
            tracker.scalar("encoder/train/learning_rate", sched.get_last_lr()[0], step)
            tracker.scalar("encoder/train/samples_per_s", step * len(batch) / max(clock["elapsed"], 1e-9), step)
        out_of_time = clock["elapsed"] > cfg.max_minutes * 60
        if dev.queries and (step % cfg.eval_every == 0 or step == total or out_of_time):
            score = dev_ndcg(model, tokenizer, texts, dev, cfg, device)
            report.history.append((step, score))
            if tracker is not None:
                tracker.scalar("encoder/valid/dev_ndcg@10", score, step)
                tracker.flush()
            log.info("step %d loss %.4f dev nDCG@10 %.4f", step, loss_value, score)
            if score > best:
                best, report.best_step, bad_evals = score, step, 0
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    report.stopped = f"early stop at step {step}: no dev gain in {bad_evals} evaluations"
                    break
            if checkpoint is not None and not out_of_time and step < total:
                torch_rng = D.gather_objects(torch.get_rng_state())  # each rank resumes its own dropout stream
                if d.main:
                    ckpt.save(checkpoint, {
                        "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "sched": sched.state_dict(), "rng": rng.getstate(), "torch_rng": torch_rng, "step": step,
                        "best": best, "best_state": best_state, "bad_evals": bad_evals, "history": report.history,
                        "best_step": report.best_step, "dev_ndcg_start": report.dev_ndcg_start,
                        "elapsed": clock["elapsed"]})
        if out_of_time:
            report.stopped = f"time budget of {cfg.max_minutes} min reached at step {step}"
            break
    del net  # the DistributedDataParallel wrapper holds collective state; gone before the group is
    report.steps = step
    report.stopped = report.stopped or "all batches done"
    report.dev_ndcg_best = best
    report.seconds = time.perf_counter() - started
    if d.main:  # the ranks hold the same weights; rank 0 writes them (the pipeline sends them where needed)
        model.load_state_dict(best_state)
        if cfg.method == "lora":
            model = model.merge_and_unload()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # the encoder is saved: nothing left to resume
    return report


def _fingerprint(cfg: FinetuneConfig, world: int, n_texts: int, pairs: list[tuple[str, int]]) -> str:
    """What a checkpoint must have been trained with to be resumed: settings (not the time budget: a rerun may give
    itself more time), process count and data."""
    import hashlib

    settings = {k: v for k, v in asdict(cfg).items() if k != "max_minutes"}
    h = hashlib.sha256(json.dumps([settings, world, n_texts], sort_keys=True, default=str).encode())
    for q, r in pairs:
        h.update(f"{q}\t{r}\n".encode())
    return h.hexdigest()
