"""`python -m training build-classifier` and `evaluate classify`: train, save, load and score the classifier.

The fine-tuned part: MiniLM (mean pooling) -> dropout -> linear head over the leaf paths, cross-entropy with
class weights 1/sqrt(frequency) (the long tail counts, without letting a 3-row leaf dominate), AdamW, linear
decay, epochs until the time budget; the epoch with the best dev accuracy is kept. Then, on the dev split:
a temperature for the SVM's scores and one for the network's logits, the blend weight (grid, best dev leaf
accuracy), a final temperature (calibration), and the auto-fill threshold (the lowest confidence whose dev
precision is >= 0.95 with 95% confidence, never below 0.5; see `autofill_threshold`).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.bundle_format import MANIFEST, SCHEMA_VERSION, checksum_tree
from common.classifier import MAX_LENGTH, Classifier, DenseClassifier, logits_of
from training import checkpoint as ckpt
from training import distributed as D
from training.classify import (CLASSIFIER_DIR, SparseModel, Taxonomy, autofill_threshold, ece, file_fingerprint,
                               fit_temperature, read_catalog, scores, seed_everything, softmax, split_of,
                               texts_of)

log = logging.getLogger(__name__)
AUTOFILL_PRECISION = 0.95


def train_dense(encoder_dir: Path, texts: list[str], y: np.ndarray, n_classes: int, dev_texts: list[str],
                dev_y: np.ndarray, budget_s: float, epochs: int, bf16: bool, seed: int,
                batch: int = 32, tracker=None, checkpoint: Path | None = None) -> tuple[DenseClassifier, Any, dict]:
    """Fine-tune MiniLM + head. Data-parallel when the process group is joined (training.distributed): every rank
    calls this with the same arguments; each step's `batch` rows are split across the ranks, the gradients
    averaged (DistributedDataParallel), the dev split encoded in shares; time and best-epoch decisions are rank 0's.
    checkpoint: a file rank 0 writes after every epoch and a later call with the same data and settings resumes
    from (removed once training ends)."""
    from transformers import AutoModel, AutoTokenizer

    d = D.current()
    if batch < d.world:
        raise ValueError(f"classifier batch {batch} is smaller than the {d.world} processes: each needs a row")
    seed_everything(seed)
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    model = DenseClassifier(AutoModel.from_pretrained(encoder_dir), n_classes)
    if getattr(model.encoder, "pooler", None) is not None:
        # Mean pooling never reads the pooler: no gradient reaches it (DistributedDataParallel waits for one from
        # every trainable parameter), and AdamW leaves it as it is anyway.
        model.encoder.pooler.requires_grad_(False)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
    weights = weights / weights[counts > 0].mean()
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    head_params = list(model.head.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": 1e-4},
                             {"params": head_params, "lr": 3e-3}], weight_decay=0.01)
    per_rank = batch // d.world
    step_rows = per_rank * d.world  # rows per optimiser step over all ranks
    steps_per_epoch = (len(texts) + step_rows - 1) // step_rows
    # Linear warm-up and decay over the steps that will actually run: `epochs` of them, or fewer once the
    # first steps have shown how many fit in the time budget (so the rate still decays to ~0 at the end).
    plan = {"total": steps_per_epoch * epochs}
    warmup = max(1, int(0.05 * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (plan["total"] - s) / max(plan["total"] - warmup, 1))))
    rng = np.random.default_rng(seed)  # the same stream on every rank: the same batches everywhere
    best, best_acc, history, step, first_epoch, spent = None, -1.0, [], 0, 0, 0.0
    fingerprint = _fingerprint(texts, y, n_classes, epochs, batch, seed, bf16, d.world) if checkpoint else ""
    # Rank 0's weights reach the other ranks when DistributedDataParallel wraps the model; only rank 0 saves the best.
    resumed = ckpt.load(checkpoint, fingerprint, local=("model", "best")) if checkpoint else None
    if resumed is not None:
        if d.main:
            model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["opt"])
        sched.load_state_dict(resumed["sched"])
        rng.bit_generator.state = resumed["rng"]
        plan["total"], step, first_epoch, spent = resumed["plan_total"], resumed["step"], resumed["epoch"], resumed["elapsed"]
        best, best_acc, history = resumed.get("best"), resumed["best_acc"], resumed["history"]
        log.info("classifier: resumes after epoch %d (checkpoint %s)", first_epoch, checkpoint)
    net: torch.nn.Module = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # (Wrapping copies rank 0's weights to the other ranks: a resumed model reaches them here.)
        net = DistributedDataParallel(model, forward_sync_buffers=False)  # the buffers are constants
        torch.manual_seed(seed * 1000 + d.rank + 1)  # dropout: each rank its own masks
    if resumed is not None:
        torch.set_rng_state(resumed["torch_rng"][d.rank])
    started = time.perf_counter() - spent  # the time budget counts the time already spent
    for epoch in range(first_epoch, epochs):
        net.train()
        # Shuffle, then sort within chunks of 50 batches by length: little padding, still random batches.
        perm = rng.permutation(len(texts))
        chunk = step_rows * 50
        order = np.concatenate([sorted(perm[i: i + chunk], key=lambda j: len(texts[j]))
                                for i in range(0, len(perm), chunk)])
        blocks = [order[i: i + step_rows] for i in range(0, len(order), step_rows)]
        rng.shuffle(blocks)
        blocks = [b for b in blocks if len(b) >= d.world]  # a last block too small to give every rank a row
        total, seen, out_of_time = 0.0, 0, False
        bar = tqdm(blocks, desc=f"classifier epoch {epoch + 1}", leave=False, disable=not d.main)
        for block in bar:
            idx = block[len(block) * d.rank // d.world: len(block) * (d.rank + 1) // d.world]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(enc["input_ids"], enc["attention_mask"])
            loss = loss_fn(logits.float(), torch.as_tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            elapsed = D.agree(time.perf_counter() - started)  # rank 0's clock: every rank stops at the same step
            if step == 30:  # ~1 s a step here: plan the schedule on the measured speed (dev passes included)
                per_step = elapsed / step
                fits = int(budget_s / per_step * 0.92)
                plan["total"] = max(warmup + 1, min(plan["total"], fits))
                log.info("classifier: %.2f s a step; %d steps (%.1f epochs) fit in the budget", per_step,
                         plan["total"], plan["total"] / steps_per_epoch)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}")
            if tracker is not None:
                tracker.scalar("classifier/train/loss", float(loss.detach()), step)
                tracker.scalar("classifier/train/learning_rate", sched.get_last_lr()[0], step)
            if elapsed > budget_s or step >= plan["total"]:
                out_of_time = True
                break
        total, seen = D.all_sum([total, seen])
        dev_acc = dev_accuracy(model, tok, dev_texts, dev_y, bf16)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "dev_leaf_accuracy": dev_acc,
                        "rows": int(seen), "seconds": time.perf_counter() - started})
        if tracker is not None:
            tracker.scalar("classifier/train/epoch_loss", total / max(seen, 1), epoch + 1)
            tracker.scalar("classifier/valid/leaf_accuracy", dev_acc, epoch + 1)
            tracker.flush()
        log.info("classifier epoch %d: loss %.4f, dev leaf accuracy %.4f (%.0fs)", epoch + 1, total / max(seen, 1),
                 dev_acc, time.perf_counter() - started)
        if dev_acc > best_acc:
            best_acc, best = dev_acc, copy.deepcopy(model.state_dict())
        if out_of_time:
            break
        if checkpoint is not None and epoch + 1 < epochs:
            elapsed = D.agree(time.perf_counter() - started)
            torch_rng = D.gather_objects(torch.get_rng_state())  # each rank resumes its own dropout stream
            if d.main:
                ckpt.save(checkpoint, {
                    "fingerprint": fingerprint, "model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "torch_rng": torch_rng, "rng": rng.bit_generator.state,
                    "plan_total": plan["total"], "step": step, "epoch": epoch + 1, "elapsed": elapsed, "best": best,
                    "best_acc": best_acc, "history": history})
    del net  # the DistributedDataParallel wrapper holds collective state; gone before the group is
    if best is not None:  # (ranks other than 0 that resumed hold no best state; only rank 0's is saved)
        model.load_state_dict(best)
    if checkpoint is not None and d.main:
        checkpoint.unlink(missing_ok=True)  # trained: nothing left to resume
    return model, tok, {"epochs": history, "best_dev_leaf_accuracy": best_acc, "batch_size": step_rows,
                        "world_size": d.world, "per_rank_batch": per_rank, "lr": {"encoder": 1e-4, "head": 3e-3}}


def _fingerprint(texts: list[str], y: np.ndarray, n_classes: int, epochs: int, batch: int, seed: int, bf16: bool,
                 world: int) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps([n_classes, epochs, batch, seed, bf16, world, len(texts)]).encode())
    h.update("\n".join(texts).encode())
    h.update(np.asarray(y, np.int64).tobytes())
    return h.hexdigest()


def dev_accuracy(model: DenseClassifier, tok, texts: list[str], y: np.ndarray, bf16: bool) -> float:
    """Leaf accuracy on the dev rows; data-parallel, each rank scores its share (rank 0's result decides)."""
    if not len(y):
        return 0.0
    part = D.shard_range(len(texts))
    hits = logits_of(model, tok, texts[part.start:part.stop], bf16).argmax(1) == y[part.start:part.stop]
    return D.agree(float(np.sum(D.gather_rows(hits.astype(np.float64))) / len(y)))


def fit_blend(sparse_scores: np.ndarray, dense_logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Temperatures and blend weight from the dev split."""
    from training.classify import nll

    ts, td = fit_temperature(sparse_scores, y), fit_temperature(dense_logits, y)
    log_s = np.log(np.clip(softmax(sparse_scores / ts), 1e-12, 1))
    log_d = np.log(np.clip(softmax(dense_logits / td), 1e-12, 1))
    best = None
    for w in np.linspace(0, 1, 21):
        z = w * log_d + (1 - w) * log_s
        key = (float(np.mean(z.argmax(1) == y)), -nll(softmax(z), y))
        if best is None or key > best[0]:
            best = (key, float(w))
    w = best[1]
    z = w * log_d + (1 - w) * log_s
    return {"svm_temperature": ts, "dense_temperature": td, "dense_weight": w, "temperature": fit_temperature(z, y)}


def build_classifier(data: Path, out: Path, max_minutes: float = 15.0, epochs: int = 12, seed: int = 0,
                     encoder_dir: Path | None = None, bf16: bool = False, tracker=None,
                     checkpoint: Path | None = None) -> dict[str, Any]:
    """Train on the train split of `data`, fit the blend on dev, report test, write the bundle to `out`.

    Data-parallel (training.distributed): rank 0 reads the data, fits the linear model and sends the network's
    training rows to the other ranks, which join the fine-tuning and return {} (rank 0 writes everything).
    checkpoint: the network's per-epoch checkpoint (a rerun with the same data and settings resumes from it)."""
    from safetensors.torch import save_file

    from training.__main__ import default_encoder_dir

    started = time.perf_counter()
    encoder_dir = Path(encoder_dir or default_encoder_dir())
    if not D.current().main:
        rows = D.agree(None, patient=True)  # waits while rank 0 reads the data and fits the linear model
        train_dense(encoder_dir, *rows, epochs, bf16, seed, checkpoint=checkpoint)
        return {}
    df = read_catalog(data)
    df["split"] = [split_of(t) for t in df["title"]]
    train, dev, test = (df[df["split"] == s] for s in ("train", "dev", "test"))
    if not len(train) or not len(dev):
        raise ValueError(f"{data}: too few rows to split into train and dev ({len(df)} rows)")
    tax = Taxonomy.from_paths(pd_concat_paths(train, dev))
    y_train = np.array([tax.index[p] for p in train["category_path"]])
    y_dev = np.array([tax.index[p] for p in dev["category_path"]])
    t_train, t_dev = texts_of(train), texts_of(dev)
    print(f"{data.name}: {len(df)} rows (train {len(train)}, dev {len(dev)}, test {len(test)}), "
          f"{len(tax.leaves)} leaf paths, depth {tax.depth}", flush=True)
    sparse = SparseModel().fit(t_train, y_train, len(tax.leaves))
    sparse_s = elapsed_s(started)
    # The network gets what is left of the budget, less a reserve for the dev/test passes and the bundle.
    reserve = 60.0 + 0.004 * (len(dev) + len(test))
    budget = max(60.0, 60.0 * max_minutes - elapsed_s(started) - reserve)
    D.agree((t_train, y_train, len(tax.leaves), t_dev, y_dev, budget), patient=True)  # the other ranks' rows
    dense, tok, report = train_dense(encoder_dir, t_train, y_train, len(tax.leaves), t_dev, y_dev, budget, epochs,
                                     bf16, seed, tracker=tracker, checkpoint=checkpoint)
    dev_sparse, dev_dense = sparse.scores(t_dev), logits_of(dense, tok, t_dev, bf16)  # one pass each, used twice
    blend = fit_blend(dev_sparse, dev_dense, y_dev)
    clf = Classifier(tax, sparse, dense, tok, blend, bf16)
    dev_probs = softmax(clf.combined_logits(dev_sparse, dev_dense) / blend["temperature"])
    threshold = autofill_threshold(dev_probs.max(1), dev_probs.argmax(1) == y_dev, AUTOFILL_PRECISION)
    summary: dict[str, Any] = {"rows": {"train": len(train), "dev": len(dev), "test": len(test)},
                               "leaves": len(tax.leaves), "depth": tax.depth, "blend": blend,
                               "autofill_threshold": threshold, "dense": report, "sparse_fit_s": sparse_s}
    if len(test):
        known = test[test["category_path"].isin(tax.index)]
        probs = clf.predict_proba(texts_of(test))
        summary["test"] = {**scores(tax, test["category_path"].tolist(), probs.argmax(1)),
                           "ece": ece(probs, probs.argmax(1) == np.array([tax.index.get(p, -1)
                                                                           for p in test["category_path"]])),
                           "unseen_leaf_rows": len(test) - len(known)}
    # The bundle: everything under classifier/, the manifest (with every file's sha256) written last.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = out / CLASSIFIER_DIR
    dense.encoder.save_pretrained(root / "encoder", safe_serialization=True)
    tok.save_pretrained(root / "encoder")
    save_file({"weight": dense.head.weight.detach().contiguous(), "bias": dense.head.bias.detach().contiguous()},
              root / "head.safetensors")
    (root / "taxonomy.json").write_text(json.dumps({"leaves": tax.leaves, "separator": " > "}, ensure_ascii=False))
    sparse_meta = sparse.save(root / "sparse")
    summary["build_s"] = elapsed_s(started)
    now = datetime.now(timezone.utc)
    manifest = {
        "schema_version": SCHEMA_VERSION, "bundle_version": f"classifier-{Path(data).stem}-{now:%Y%m%dT%H%M%SZ}",
        "created_at": now.isoformat(), "kind": "classifier",
        "classifier": {"path": CLASSIFIER_DIR, "leaves": len(tax.leaves), "depth": tax.depth, "blend": blend,
                       "autofill_threshold": threshold, "autofill_precision_target": AUTOFILL_PRECISION,
                       "sparse": sparse_meta, "bf16": bf16, "max_length": 40, "seed": seed,
                       "train": {"path": str(Path(data).resolve()), "sha256": file_fingerprint(data),
                                 "split": "md5(lower(title)) % 100: <10 test, <20 dev, else train"},
                       "metrics": summary},
    }
    manifest["files"] = checksum_tree(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return summary


def check_classifier(source: Path) -> dict[str, Any]:
    """The manifest of a bundle with a classifier whose files match their checksums (else a clear error)."""
    path = Path(source) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{source}: not a bundle (no {MANIFEST})")
    src = json.loads(path.read_text())
    meta = src.get("classifier")
    if meta is None:
        raise FileNotFoundError(f"{source}: the bundle has no classifier (its manifest has no 'classifier' part)")
    part = meta.get("path", CLASSIFIER_DIR)
    listed = {rel: digest for rel, digest in src.get("files", {}).items() if rel.startswith(part + "/")}
    if not listed:
        raise ValueError(f"{source}: the manifest lists no files under {part}/")
    have = checksum_tree(Path(source) / part)
    for rel, digest in listed.items():
        if have.get(rel[len(part) + 1:]) != digest:
            raise ValueError(f"{source}: {rel} does not match its checksum in the manifest; the classifier is damaged")
    return src


def attach_classifier(bundle: Path, source: Path) -> dict[str, Any]:
    """Copy the classifier part of `source` (a classifier bundle, checked against its own checksums) into the
    search bundle `bundle` and seal it again (new checksums, new version). The caller builds `bundle` in a
    temporary folder and renames it into place afterwards, so no reader sees it half done."""
    import shutil

    from training.bundle_writer import seal

    src = check_classifier(source)
    meta = src["classifier"]
    part = meta.get("path", CLASSIFIER_DIR)
    target = Path(bundle) / CLASSIFIER_DIR
    if target.exists():
        raise FileExistsError(f"{bundle}: already has a {CLASSIFIER_DIR}/ part")
    shutil.copytree(Path(source) / part, target)
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    manifest["classifier"] = {**meta, "path": CLASSIFIER_DIR, "source_bundle": src.get("bundle_version", "")}
    return seal(Path(bundle), manifest)


def pd_concat_paths(*frames) -> list[str]:
    return [p for f in frames for p in f["category_path"]]


def elapsed_s(started: float) -> float:
    return time.perf_counter() - started


# --- evaluate ------------------------------------------------------------------------------------------

def zero_shot(train_texts: list[str], train_y: np.ndarray, n_classes: int, texts: list[str]) -> np.ndarray:
    """Nearest centroid on the pretrained encoder: the predicted leaf of each text."""
    from common.encoding import TextEncoder
    from training.__main__ import default_encoder_dir

    enc = TextEncoder(default_encoder_dir(), device="cpu", dtype="float32", max_length=MAX_LENGTH)
    tv = enc.encode(train_texts, batch_size=128)
    centroids = np.zeros((n_classes, tv.shape[1]), np.float32)
    np.add.at(centroids, train_y, tv)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.where(norms > 0, centroids / np.maximum(norms, 1e-9), 0)
    return (enc.encode(texts, batch_size=128) @ centroids.T).argmax(1)


def evaluate_classifier(bundle: Path, data: Path, json_out: Path | None, plot: Path | None = None) -> dict[str, Any]:
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    meta = manifest.get("classifier")
    if meta is None:
        raise FileNotFoundError(f"{bundle}: the bundle has no classifier part")
    clf = Classifier.load(bundle)
    tax = clf.tax
    train_info = meta["train"]
    train_df = read_catalog(Path(train_info["path"]))
    train_df = train_df[[split_of(t) == "train" for t in train_df["title"]]]
    df = read_catalog(data)
    same_file = file_fingerprint(data) == train_info["sha256"]
    if same_file:  # the build's own file: score its test split only, never rows it trained or tuned on
        df = df[[split_of(t) == "test" for t in df["title"]]]
    texts, truth = texts_of(df), df["category_path"].tolist()
    y_true = np.array([tax.index.get(p, -1) for p in truth])
    probs = clf.predict_proba(texts)
    pred = probs.argmax(1)
    conf = probs.max(1)
    threshold = float(meta["autofill_threshold"])
    filled = conf >= threshold
    ours = {**scores(tax, truth, pred), "ece": ece(probs, pred == y_true), "autofill_threshold": threshold,
            "autofill_coverage": float(filled.mean()),
            "autofill_precision": float((pred[filled] == y_true[filled]).mean()) if filled.any() else 0.0}
    train_y = np.array([tax.index[p] for p in train_df["category_path"]])
    train_texts = texts_of(train_df)
    svm = SparseModel(C=float(meta["sparse"]["C"])).fit(train_texts, train_y, len(tax.leaves))
    result = {"model": ours, "tfidf_svm": scores(tax, truth, svm.scores(texts).argmax(1)),
              "zero_shot": scores(tax, truth, zero_shot(train_texts, train_y, len(tax.leaves), texts)),
              "data": str(data), "scored_split": "test (the bundle's own file)" if same_file else "all rows",
              "bundle": manifest["bundle_version"], "leaves": len(tax.leaves)}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
        plot = plot or Path(json_out).with_suffix(".png")
    if plot is not None:
        confusion_plot(tax, truth, pred, Path(plot))
    return result


def confusion_plot(tax: Taxonomy, truth: list[str], pred: np.ndarray, out: Path, top: int = 15) -> None:
    """Row-normalised confusion matrices per level (the `top` most frequent prefixes of each level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = min(tax.depth, 3)
    fig, axes = plt.subplots(1, levels, figsize=(6.5 * levels, 6), squeeze=False)
    pred_paths = [tax.leaves[i] for i in pred]
    for lvl in range(levels):
        t = [tax.prefix(p, lvl) for p in truth]
        p = [tax.prefix(q, lvl) for q in pred_paths]
        names, counts = np.unique(t, return_counts=True)
        names = list(names[np.argsort(-counts)][:top])
        pos = {n: i for i, n in enumerate(names)}
        m = np.zeros((len(names), len(names) + 1))
        for a, b in zip(t, p):
            if a in pos:
                m[pos[a], pos.get(b, len(names))] += 1
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax = axes[0][lvl]
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        short = [n.split(" > ")[-1][:18] for n in names]
        ax.set_xticks(range(len(names) + 1), short + ["(other)"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), short, fontsize=7)
        ax.set_title(f"level {lvl + 1}: true (rows) vs predicted, {len(names)} most frequent")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
