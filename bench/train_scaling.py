"""Data-parallel training throughput: 1 process against 2 processes (torchrun, gloo) on this machine.

Trains the sequential recommender on Amazon Beauty (leave-one-out, the same trainer and split a build uses)
for the same number of epochs with the same effective batch (256 users a step: 256 in one process, 128 in
each of two) and the same learning rate, validating after every epoch. Reports steps/s and samples/s of the
training loop (validation excluded), the time each run takes to first reach the validation NDCG@10 that both
reach, and how far apart their best validation metrics end (`same_metric_within`, absolute NDCG@10).

One process uses every core with torch's intra-op threads; each of two processes gets half (torchrun sets
OMP_NUM_THREADS=1 per process on this 2-core machine), so the ratio says what data parallelism buys on one
machine, not across machines.

    python bench/train_scaling.py --json out/train_scaling.json [--epochs 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import run_processes  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch

    from training import distributed as D
    from training.behaviour import load_beauty
    from training.recbuild import _attributes, _split
    from training.recommender import SeqRecConfig, train_seqrec

    d = D.from_env("cpu")
    b = load_beauty(args.data_dir)
    split, _, _ = _split(b, "leave_one_out", None)
    attrs, n_attrs = _attributes(b)
    cfg = SeqRecConfig(max_epochs=args.epochs, eval_every=1, patience=10 ** 6, max_minutes=60, seed=args.seed)
    t0 = time.perf_counter()
    _, report = train_seqrec(split, cfg, attrs=attrs, n_attrs=n_attrs)
    if d.main:
        Path(args.worker_out).write_text(json.dumps({
            "world_size": d.world, "threads_per_process": torch.get_num_threads(), "wall_s": time.perf_counter() - t0,
            "history": report["history"], "samples_per_s": report["samples_per_s"],
            "steps_per_s": report["steps_per_s"], "effective_batch_size": report["effective_batch_size"],
            "per_rank_batch": report["per_rank_batch"], "best": report["valid_ndcg@10"]}))
    D.shutdown()


def run(n: int, args: argparse.Namespace, out: Path) -> dict:
    return run_processes(n, Path(__file__).resolve(), ["--worker-out", str(out), "--epochs", str(args.epochs),
                                                       "--data-dir", str(args.data_dir), "--seed", str(args.seed),
                                                       "--json", "-"], out)


def time_to(history: list[dict], target: float) -> float | None:
    for h in history:
        if h.get("valid_ndcg@10", -1) >= target - 1e-12:
            return h["seconds"]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("SEARCHREC_DATA_DIR", ROOT.parent / "shared" / "data")))
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return 0
    if not (args.data_dir / "amazon_beauty" / "Beauty.txt").is_file():
        print(f"no Amazon Beauty data under {args.data_dir} (set --data-dir or SEARCHREC_DATA_DIR)", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp) / "one.json")
        two = run(2, args, Path(tmp) / "two.json")
    target = min(one["best"], two["best"])
    result = {
        "machine": f"{os.cpu_count()} cores, CPU, gloo", "dataset": "amazon_beauty (leave-one-out)",
        "epochs": args.epochs, "effective_batch_size": one["effective_batch_size"],
        "samples_per_s_1": one["samples_per_s"], "samples_per_s_2": two["samples_per_s"],
        "steps_per_s_1": one["steps_per_s"], "steps_per_s_2": two["steps_per_s"],
        "speedup_2_over_1": round(two["samples_per_s"] / one["samples_per_s"], 3),
        "best_valid_ndcg10_1": one["best"], "best_valid_ndcg10_2": two["best"],
        "same_metric_within": round(abs(one["best"] - two["best"]), 5),
        "target_valid_ndcg10": target,
        "time_to_target_s_1": time_to(one["history"], target), "time_to_target_s_2": time_to(two["history"], target),
        "wall_s_1": one["process_wall_s"], "wall_s_2": two["process_wall_s"],
        "threads_per_process_1": one["threads_per_process"], "threads_per_process_2": two["threads_per_process"],
        "history_1": one["history"], "history_2": two["history"],
    }
    print(f"{'processes':<10} {'samples/s':>10} {'steps/s':>8} {'best nDCG@10':>13} {'to target s':>12}")
    for n, r in ((1, one), (2, two)):
        print(f"{n:<10} {r['samples_per_s']:>10.1f} {r['steps_per_s']:>8.3f} {r['best']:>13.4f} "
              f"{str(result[f'time_to_target_s_{n}']):>12}")
    print(f"2 over 1: {result['speedup_2_over_1']:.2f}x samples/s; best metrics within {result['same_metric_within']:.4f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
