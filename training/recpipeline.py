"""`python -m training build` for behaviour data: prepare -> encode the catalog -> train the
sequential recommender -> write the bundle -> evaluate it as served -> seal -> rename into place.

Datasets: `beauty` and `online_retail` under --data-dir, `seqfile --path FILE` (any file of the
Beauty shape, same trainer), or `--catalog FILE --interactions CSV` (the project's format). Served
feedback from a server's --state-dir joins the training data with `--events DIR`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bundle_format import sha256_file
from common.eventlog import feedback_events
from training.behaviour import Behaviour, add_events, load_beauty, load_interactions_csv, load_seqfile, prepare_online_retail
from common.encoding import TextEncoder
from training.bundle_writer import BuildOptions, follow_bundle, seal, write_bundle
from training.catalog import load_catalog
from training.data import DataError
from training.recbuild import build_recommender
from training.recommender import SeqRecConfig
from training.tracking import NULL, Tracker

log = logging.getLogger(__name__)
TEST_DAYS = 30  # Online Retail: the last month is the test period


@dataclass
class BehaviourInput:
    behaviour: Behaviour
    split: str  # leave_one_out | temporal | all
    cutoff: int | None
    name: str
    use_text: bool
    fingerprints: dict[str, str]


def prepare_input(dataset: str | None, data_dir: Path, path: Path | None, catalog: Path | None,
                  interactions: Path | None, events: Path | None, on_error: str) -> BehaviourInput:
    if dataset == "beauty":
        b = load_beauty(data_dir, on_error)
        src = Path(data_dir) / "amazon_beauty" / "Beauty.txt"
        inp = BehaviourInput(b, "leave_one_out", None, "beauty", False, {"Beauty.txt": f"sha256:{sha256_file(src)}"})
    elif dataset == "online_retail":
        b = prepare_online_retail(data_dir)
        last = max(t[-1] for t in b.times if t)
        src = Path(data_dir) / "online_retail" / "online_retail.parquet"
        inp = BehaviourInput(b, "temporal", int(last - TEST_DAYS * 86400), "online_retail", True,
                             {"online_retail.parquet": f"sha256:{sha256_file(src)}"})
    elif dataset == "seqfile":
        if path is None:
            raise DataError("--dataset seqfile needs --path FILE (one user per line: user item item ...)")
        b = load_seqfile(path, on_error)
        inp = BehaviourInput(b, "leave_one_out", None, Path(path).stem, False, {Path(path).name: f"sha256:{sha256_file(path)}"})
    elif catalog is not None and interactions is not None:
        items = load_catalog(catalog)
        b = load_interactions_csv(interactions, items, on_error)
        inp = BehaviourInput(b, "all", None, Path(catalog).stem, True,
                             {"catalog": f"sha256:{sha256_file(catalog)}", "interactions": f"sha256:{sha256_file(interactions)}"})
    else:
        raise DataError("give --dataset beauty|online_retail, --dataset seqfile --path FILE, or --catalog with --interactions")
    if events is not None:
        evs = feedback_events(events)
        used = add_events(inp.behaviour, evs)
        inp.fingerprints["served_events"] = f"{used} of {len(evs)} events from {events}"
    return inp


def follow(inp: BehaviourInput, opts: BuildOptions, cfg: SeqRecConfig, checkpoint: Path | None) -> None:
    """A data-parallel rank other than 0: the same collective steps as `build` (encode a share of the catalog,
    add a share to a large catalog's ANN index, train), writing nothing."""
    encoder = TextEncoder(opts.encoder_dir, device=opts.device, dtype=opts.dtype, max_length=opts.max_length)
    vectors = follow_bundle(encoder, inp.behaviour.items, opts)
    build_recommender(None, inp.behaviour, inp.split, inp.cutoff, cfg, vectors, inp.use_text, checkpoint=checkpoint)


def build(inp: BehaviourInput, out: Path, opts: BuildOptions, cfg: SeqRecConfig, evaluate: bool,
          device: str, checkpoint: Path | None = None, tracker: Tracker = NULL) -> dict[str, Any]:
    """Write, evaluate and seal the bundle; it appears at `out` only when complete. `checkpoint`: the
    recommender's epoch checkpoint (a build started again resumes from it; removed once the bundle is in place)."""
    if out.exists():
        raise FileExistsError(f"{out}: output directory already exists; choose a new path")
    b = inp.behaviour
    opts.recommender = lambda root, vectors: build_recommender(root, b, inp.split, inp.cutoff, cfg, vectors,
                                                               inp.use_text, checkpoint=checkpoint, tracker=tracker)
    opts.data_fingerprints = inp.fingerprints
    opts.extra_manifest = {"data_report": b.report.as_dict()}
    tmp = out.parent / f".{out.name}.build-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        manifest = write_bundle(b.items, tmp, opts)
        if evaluate and inp.split != "all":
            from training.evaluate_rec import evaluate_recommend, format_table

            t0 = time.perf_counter()
            results = evaluate_recommend(tmp, b, device)
            print(format_table(results))
            manifest["metrics"] = {"recommend": results}
            tracker.table("evaluation/recommend", {k: v for k, v in results.items() if k != "meta"})
            for system, row in results.items():
                if system in ("bundle", "popularity", "item_knn") and isinstance(row, dict):
                    tracker.scalars(f"evaluation/{system}", row, 0)
            manifest["timings"]["evaluate_s"] = round(time.perf_counter() - t0, 1)
            manifest = seal(tmp, manifest)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tracker.manifest(manifest)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return manifest


def summary(manifest: dict[str, Any], out: Path, started: float) -> str:
    rec = manifest["recommender"]
    tr = rec["training"]
    lines = [
        f"bundle {manifest['bundle_version']} -> {out}",
        f"  items {manifest['items']['count']}, users {rec['user_count']}, interactions {rec['interactions']}, "
        f"repeat rate {rec['repeat_rate']:.3f} (repeats {'allowed' if rec['allow_repeats'] else 'excluded'})",
        f"  recommender: {tr['epochs_run']} epochs in {tr['seconds']:.0f}s (best {tr['best_epoch']}, {tr['stop']}), "
        f"valid NDCG@{rec['valid_k']} {rec['valid_ndcg_model_only']:.4f} -> {rec['valid_ndcg_rescored']:.4f} re-scored",
        "  steps: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in manifest["timings"].items())
        + f"; total {time.perf_counter() - started:.0f}s",
    ]
    return "\n".join(lines)

