"""Data-parallel encoder fine-tuning: 1 process against 2 processes (torchrun, gloo) on this machine.

Fine-tunes the real all-MiniLM-L6-v2 on Home Depot's training-split judgments (the pipeline's objective:
in-batch negatives plus one judged-irrelevant item per query, `training.finetune`) for the same number of steps
with the same effective batch (32 queries a step: 32 in one process, 16 on each of two, their item vectors
gathered so every query still meets all 64 items of the step) and the same learning rate. Reports samples/s
(queries a second) and steps/s of the training loop (dev evaluations excluded), the loss curves, and the dev
nDCG@10 (200 rerank-split queries over a pool of their judged items and 2,000 random ones) both reach after
the same steps: `encoder_same_metric_within` is the absolute difference.

Negatives here are the judged-irrelevant items only (the build also mines BM25 and zero-shot negatives, which
needs the whole catalog encoded first; minutes that measure nothing about data parallelism). Precision as a
build on this CPU (bf16 autocast where the CPU has native bf16). One process uses every core with intra-op
threads; each of two gets half (torchrun sets OMP_NUM_THREADS=1 per process on this 2-core machine).

    python bench/encoder_scaling.py --json out/encoder_scaling.json [--steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import run_processes  # noqa: E402


def prepare(data_dir: Path, out: Path, seed: int) -> dict:
    """Texts, (query, row) pairs, judged negatives, positives and the dev set, pickled for the workers."""
    import numpy as np

    from training.bundle_writer import passage_text
    from training.data import prepare_homedepot
    from training.finetune import DevSet
    from training.pipeline import MAYBE_RELEVANT_AT, POSITIVE_AT

    p = prepare_homedepot(data_dir, "fail")
    items, j = p.items.reset_index(drop=True), p.judgments
    row = {i: n for n, i in enumerate(items["item_id"])}
    texts = items.apply(passage_text, axis=1).tolist()
    train = j[j.split == "train"]
    pairs = [(q, row[i]) for q, i, r in zip(train["query"], train["item_id"], train["relevance"]) if r >= POSITIVE_AT]
    positives: dict[str, set[int]] = {}
    negatives: dict[str, list[int]] = {}
    for q, i, r in zip(j["query"], j["item_id"], j["relevance"]):
        if r >= MAYBE_RELEVANT_AT:
            positives.setdefault(q, set()).add(row[i])
        else:
            negatives.setdefault(q, []).append(row[i])
    rng = random.Random(seed)
    dev_j = j[j.split == "rerank"]
    dev_q = rng.sample(sorted(dev_j["query"].unique()), 200)
    grades: dict[str, dict[int, float]] = {q: {} for q in dev_q}
    for q, i, r in zip(dev_j["query"], dev_j["item_id"], dev_j["relevance"]):
        if q in grades:
            grades[q][row[i]] = r - 1.0
    pool = {r for g in grades.values() for r in g} | set(rng.sample(range(len(items)), 2000))
    dev = DevSet(dev_q, grades, np.array(sorted(pool), dtype=np.int64))
    out.write_bytes(pickle.dumps((texts, pairs, negatives, positives, dev)))
    return {"items": len(texts), "pairs": len(pairs), "dev_queries": len(dev_q), "dev_pool": len(pool)}


def worker(args: argparse.Namespace) -> None:
    import torch

    from training import distributed as D
    from training.__main__ import default_encoder_dir
    from training.finetune import FinetuneConfig, finetune_encoder

    d = D.from_env("cpu")
    texts, pairs, negatives, positives, dev = pickle.loads(Path(args.inputs).read_bytes())
    ticks: list[tuple[int, float, float]] = []
    # Evaluations only before the first step and after the last (eval_every > steps): the ticks between step 1
    # and the last step are training alone.
    cfg = FinetuneConfig(batch_size=32, max_steps=args.steps, eval_every=10 ** 6, patience=10 ** 6, max_minutes=60,
                         seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        report = finetune_encoder(default_encoder_dir(), texts, pairs, negatives, positives, dev, Path(tmp) / "enc",
                                  cfg, on_step=lambda s, m, loss: ticks.append((s, time.perf_counter(), loss)))
    if d.main:
        span = ticks[-1][1] - ticks[0][1]
        steps = len(ticks) - 1
        Path(args.worker_out).write_text(json.dumps({
            "world_size": d.world, "threads_per_process": torch.get_num_threads(), "precision": report.precision,
            "steps": report.steps, "effective_batch": report.effective_batch, "per_rank_batch": report.per_rank_batch,
            "steps_per_s": round(steps / span, 4), "samples_per_s": round(steps * report.effective_batch / span, 2),
            "loss": [round(t[2], 4) for t in ticks], "dev_ndcg_start": report.dev_ndcg_start,
            "dev_ndcg_end": report.history[-1][1], "seconds": round(report.seconds, 1)}))
    D.shutdown()


def run(n: int, args: argparse.Namespace, inputs: Path, out: Path) -> dict:
    return run_processes(n, Path(__file__).resolve(), ["--worker-out", str(out), "--inputs", str(inputs), "--steps",
                                                       str(args.steps), "--seed", str(args.seed), "--json", "-"], out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SEARCHREC_DATA_DIR", ROOT.parent / "shared" / "data")))
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return 0
    if not (args.data_dir / "homedepot" / "judgments.csv").is_file():
        print(f"no Home Depot data under {args.data_dir} (set --data-dir or SEARCHREC_DATA_DIR)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pkl"
        t0 = time.perf_counter()
        data = prepare(args.data_dir, inputs, args.seed)
        print(f"prepared {data} in {time.perf_counter() - t0:.0f}s", flush=True)
        one = run(1, args, inputs, Path(tmp) / "one.json")
        two = run(2, args, inputs, Path(tmp) / "two.json")
    result = {
        "machine": f"{os.cpu_count()} cores, CPU, gloo", "dataset": "homedepot (train-split judgments)", **data,
        "steps": args.steps, "effective_batch": one["effective_batch"], "precision": one["precision"],
        "encoder_samples_per_s_1": one["samples_per_s"], "encoder_samples_per_s_2": two["samples_per_s"],
        "encoder_steps_per_s_1": one["steps_per_s"], "encoder_steps_per_s_2": two["steps_per_s"],
        "encoder_speedup_2_over_1": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "dev_ndcg10_start": one["dev_ndcg_start"],
        "dev_ndcg10_1": one["dev_ndcg_end"], "dev_ndcg10_2": two["dev_ndcg_end"],
        "encoder_same_metric_within": round(abs(one["dev_ndcg_end"] - two["dev_ndcg_end"]), 5),
        "threads_per_process_1": one["threads_per_process"], "threads_per_process_2": two["threads_per_process"],
        "per_rank_batch_2": two["per_rank_batch"], "wall_s_1": one["process_wall_s"], "wall_s_2": two["process_wall_s"],
        "loss_1": one["loss"], "loss_2": two["loss"],
    }
    print(f"{'processes':<10} {'samples/s':>10} {'steps/s':>8} {'dev nDCG@10':>12}")
    for n, r in ((1, one), (2, two)):
        print(f"{n:<10} {r['samples_per_s']:>10.2f} {r['steps_per_s']:>8.3f} {r['dev_ndcg_end']:>12.4f}")
    print(f"dev nDCG@10 before: {one['dev_ndcg_start']:.4f}; 2 over 1: {result['encoder_speedup_2_over_1']:.2f}x "
          f"samples/s; dev metrics within {result['encoder_same_metric_within']:.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
