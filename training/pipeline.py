"""The offline pipeline behind `python -m training build`: prepare -> zero-shot encode -> mine hard
negatives -> fine-tune the encoder -> encode + index (stage bundle) -> train the reranker ->
assemble the bundle -> evaluate it as served -> seal.

Every step writes its outputs into a work directory together with a marker that records a
fingerprint of its inputs; re-running skips steps whose marker matches, so an interrupted build
restarts where it stopped. The final bundle is assembled in a temporary sibling of --out and renamed
into place only when it is complete and evaluated.

Data-parallel under torchrun (training.distributed): rank 0 owns the work directory and its markers and alone
runs prepare, rerank and assemble; the other ranks work in a private folder of their own (they may be on other
machines) and join the collective steps: zero-shot encoding and the final catalog encoding (each rank its share
of the catalog), hard-negative mining (each rank its share of the queries) and encoder fine-tuning
(DistributedDataParallel). What a rank needs from a step it did not run (the prepared data, the fine-tuned
encoder), rank 0 sends it (share_files).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common import bundle_format as bf
from common.encoding import TextEncoder
from common.text import term_ids
from kernels import FEATURE_NAMES
from kernels import features as K
from training import data as D
from training import distributed as dist
from training.bundle_writer import (BuildOptions, build_lexical, encode_catalog, follow_bundle, passage_text, seal,
                                   similar_spec, write_bundle)
from training.finetune import DevSet, FinetuneConfig, finetune_encoder
from training.reranker import TREES_FILE, StageSearcher, export_lightgbm, labels_for, train_lambdamart
from training.tracking import NULL

log = logging.getLogger(__name__)
POSITIVE_AT = 2.33  # judgments at or above this are training positives
MAYBE_RELEVANT_AT = 2.0  # never used as negatives


@dataclass
class PipelineConfig:
    work: Path
    out: Path
    name: str
    pretrained: Path
    device: str = "cpu"
    dtype: str = "float32"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    candidates: int = 100
    evaluate: bool = True
    dev_queries: int = 200
    dev_pool_random: int = 2000
    seed: int = 0


class Pipeline:
    def __init__(self, cfg: PipelineConfig, prepare: Callable[[], D.Prepared], inputs: dict[str, Path]) -> None:
        self.cfg = cfg
        self._prepare_fn = prepare
        self.inputs = inputs
        self.timings: dict[str, float] = {}
        self.notes: dict[str, Any] = {}
        self.tracker = NULL  # the CLI sets rank 0's TensorBoard writer (training.tracking)
        self._have: set[str] = set()  # work-dir entries this rank holds (other ranks than 0: received or made)
        self._alone = False  # rank 0 after the other ranks' last step: no more collectives
        if dist.current().main:
            cfg.work.mkdir(parents=True, exist_ok=True)

    # --- restartable steps ------------------------------------------------------------------
    def _done(self, step: str, key: dict) -> bool:
        marker = self.cfg.work / f"{step}.done.json"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == key

    def _mark(self, step: str, key: dict, info: dict | None = None) -> None:
        (self.cfg.work / f"{step}.done.json").write_text(json.dumps({"key": key, "info": info or {}}, indent=2))

    def _step(self, name: str, key: dict, fn: Callable[[], dict | None], shared: bool = False,
              needs: tuple[str, ...] = (), makes: tuple[str, ...] = ()) -> None:
        """Run fn unless rank 0's marker says the step is up to date. shared: every rank runs fn (after receiving
        the work-dir entries it `needs` from rank 0; afterwards it holds what the step `makes`); otherwise rank
        0 alone runs it while the others go on to their next shared step (and wait there)."""
        d = dist.current()
        started = time.perf_counter()
        # Rank 0's markers decide for every rank (the others have none); the others may wait here meanwhile.
        done = (self._done(name, key) if self._alone or not d.enabled
                else dist.agree(self._done(name, key) if d.main else None, patient=True))
        if done:
            log.info("step %s: up to date, skipped", name)
            self.timings[name] = 0.0
            info = json.loads((self.cfg.work / f"{name}.done.json").read_text()).get("info", {}) if d.main else {}
        elif shared or d.main:
            if d.enabled and shared:
                missing = [n for n in needs if n not in self._have]
                dist.share_files(self.cfg.work, self.cfg.work, missing)
                self._have.update(missing)
            log.info("step %s ...", name)
            info = fn() or {}
            if d.main:
                self._mark(name, key, info)
            self._have.update(makes)
            self.timings[name] = round(time.perf_counter() - started, 1)
        else:
            info = {}
        self.notes[name] = info

    def fingerprints(self) -> dict[str, str]:
        return {k: "sha256:" + bf.sha256_file(p) for k, p in sorted(self.inputs.items()) if p and Path(p).is_file()}

    # --- data ---------------------------------------------------------------------------------
    def prepare(self) -> dict:
        p = self._prepare_fn()
        if p.judgments is None or p.judgments.empty:
            raise D.DataError("the pipeline needs judgments (query,item,relevance) to fine-tune and rank")
        out = self.cfg.work / "prepared"
        D.write_prepared(p, out)
        for split in D.SPLITS:
            j = p.judgments[p.judgments.split == split][["query", "item_id", "relevance"]]
            j.to_csv(out / f"{split}_judgments.csv", index=False)
        return p.report.as_dict()

    def load_prepared(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        out = self.cfg.work / "prepared"
        return pd.read_parquet(out / "items.parquet"), pd.read_parquet(out / "judgments.parquet")

    def texts(self, items: pd.DataFrame) -> list[str]:
        return items.apply(passage_text, axis=1).tolist()

    # --- zero-shot vectors and negatives ------------------------------------------------------
    def zero_shot(self) -> dict:
        items, _ = self.load_prepared()
        enc = TextEncoder(self.cfg.pretrained, device=self.cfg.device, dtype=self.cfg.dtype)
        vecs = encode_catalog(enc, items, 64)  # data-parallel: each rank its share, gathered
        np.save(self.cfg.work / "zero_shot.npy", vecs.astype(np.float16))
        return {"items": len(items)}

    def mine(self) -> dict:
        """Hard negatives per training query: judged-irrelevant items, then BM25 and zero-shot top 30."""
        items, judgments = self.load_prepared()
        row = {i: n for n, i in enumerate(items["item_id"])}
        train = judgments[judgments.split == "train"]
        every_query = sorted(train["query"].unique())
        part = dist.shard_range(len(every_query))  # data-parallel: each rank mines its share of the queries
        queries = every_query[part.start:part.stop]
        arrays, words = build_lexical(items, 1.2, 0.75)
        vocab = {w: i for i, w in enumerate(words)}
        vecs = np.load(self.cfg.work / "zero_shot.npy").astype(np.float32)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        enc = TextEncoder(self.cfg.pretrained, device=self.cfg.device, dtype=self.cfg.dtype)
        by_query = {q: g for q, g in train.groupby("query")}
        negatives: dict[str, list[int]] = {}
        for s in tqdm(range(0, len(queries), 256), desc="mine negatives", unit="batch", disable=not dist.current().main):
            qs = queries[s : s + 256]
            dense = index.search(enc.encode(qs, batch_size=128), 30)[1]
            toks = [term_ids(q, vocab) for q in qs]
            indptr = np.zeros(len(qs) + 1, np.int64)
            indptr[1:] = np.cumsum([len(t) for t in toks])
            bm25 = K.bm25_accumulate(indptr, np.concatenate(toks), arrays["bm25_indptr"], arrays["bm25_indices"],
                                     arrays["bm25_data"], len(items))
            for i, q in enumerate(qs):
                g = by_query[q]
                judged_low = [row[x] for x, r in zip(g.item_id, g.relevance) if r < MAYBE_RELEVANT_AT]
                judged_any = {row[x] for x in g.item_id}
                lex = K.topn_masked(bm25[i], np.empty(0, np.bool_), 30)[3:]
                mined = [int(r) for r in np.concatenate([lex, dense[i][3:]]) if r >= 0 and int(r) not in judged_any]
                negatives[q] = judged_low + list(dict.fromkeys(mined))[:20]
        if dist.current().enabled:
            negatives = {q: v for share in dist.gather_objects(negatives) for q, v in share.items()}
        (self.cfg.work / "negatives.json").write_text(json.dumps(negatives))
        return {"queries": len(negatives), "mean_negatives": float(np.mean([len(v) for v in negatives.values()]))}

    # --- fine-tuning --------------------------------------------------------------------------
    def finetune(self) -> dict:
        items, judgments = self.load_prepared()
        row = {i: n for n, i in enumerate(items["item_id"])}
        train = judgments[judgments.split == "train"]
        pairs = [(q, row[i]) for q, i, r in zip(train["query"], train["item_id"], train["relevance"]) if r >= POSITIVE_AT]
        positives: dict[str, set[int]] = {}
        for q, i, r in zip(judgments["query"], judgments["item_id"], judgments["relevance"]):
            if r >= MAYBE_RELEVANT_AT:
                positives.setdefault(q, set()).add(row[i])
        negatives = json.loads((self.cfg.work / "negatives.json").read_text())
        rng = random.Random(self.cfg.seed)
        dev_j = judgments[judgments.split == "rerank"]
        dev_queries = sorted(dev_j["query"].unique())
        dev_queries = rng.sample(dev_queries, min(self.cfg.dev_queries, len(dev_queries)))
        grades = {q: {} for q in dev_queries}
        for q, i, r in zip(dev_j["query"], dev_j["item_id"], dev_j["relevance"]):
            if q in grades:
                grades[q][row[i]] = r - 1.0
        pool = set(r for g in grades.values() for r in g)
        pool |= set(rng.sample(range(len(items)), min(self.cfg.dev_pool_random, len(items))))
        dev = DevSet(dev_queries, grades, np.array(sorted(pool), dtype=np.int64))
        out = self.cfg.work / f"encoder_{self.cfg.finetune.method}"
        if out.exists():
            shutil.rmtree(out)
        total = len(pairs) // self.cfg.finetune.batch_size * self.cfg.finetune.epochs
        with tqdm(total=total, desc=f"finetune ({self.cfg.finetune.method})", unit="step",
                  disable=not dist.current().main) as bar:
            def progress(n, loss):
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.3f}")

            report = finetune_encoder(self.cfg.pretrained, self.texts(items), pairs, negatives, positives, dev, out,
                                      self.cfg.finetune, device=self.cfg.device, progress=progress,
                                      tracker=self.tracker,
                                      checkpoint=self.cfg.work / f"finetune_{self.cfg.finetune.method}.ckpt")
        if dist.current().main:
            (out / "finetune_report.json").write_text(json.dumps(report.as_dict(), indent=2))
        return report.as_dict()

    # --- stage bundle, reranker, final bundle -------------------------------------------------
    def stage(self) -> dict:
        items, judgments = self.load_prepared()
        encoder_dir = self.cfg.work / f"encoder_{self.cfg.finetune.method}"
        if not dist.current().main:  # its shares of write_bundle's encoding and ANN index; rank 0 writes the rest
            enc = TextEncoder(encoder_dir, device=self.cfg.device, dtype=self.cfg.dtype,
                              max_length=BuildOptions.max_length)
            follow_bundle(enc, items, BuildOptions(encoder_dir=encoder_dir, batch_size=64))
            return {}
        stage = self.cfg.work / "stage"
        if stage.exists():
            shutil.rmtree(stage)
        # A large catalog's ANN index is tuned on real queries the encoder did not train on (the rerank
        # split; training queries sit closer to their items and flatter recall), never on test queries.
        tuning_queries = sorted(set(judgments.loc[judgments.split == "rerank", "query"]))
        opts = BuildOptions(encoder_dir=encoder_dir,
                            encoder_name=f"all-MiniLM-L6-v2 fine-tuned ({self.cfg.finetune.method})",
                            name=self.cfg.name, device=self.cfg.device, dtype=self.cfg.dtype, batch_size=64,
                            data_fingerprints=self.fingerprints(), tuning_queries=tuning_queries,
                            # The suggestion log: training-split queries only (test queries stay unseen),
                            # each judged row of a query counting one search.
                            query_log=judgments.loc[judgments.split == "train", "query"].value_counts().to_dict())
        manifest = write_bundle(items, stage, opts)
        return {"timings": manifest["timings"], "index": manifest["index"]}

    def rerank(self) -> dict:
        items, judgments = self.load_prepared()
        row = {i: n for n, i in enumerate(items["item_id"])}
        rj = judgments[judgments.split == "rerank"]
        grades: dict[str, dict[int, float]] = {}
        for q, i, r in zip(rj["query"], rj["item_id"], rj["relevance"]):
            grades.setdefault(q, {})[row[i]] = r
        queries = sorted(grades)
        rng = random.Random(self.cfg.seed)
        rng.shuffle(queries)
        cut = max(1, int(len(queries) * 0.8))
        train_q, valid_q = queries[:cut], queries[cut:] or queries[:1]
        # Queries encoded in the precision the server will run on this machine: features as served.
        searcher = StageSearcher(self.cfg.work / "stage", device=self.cfg.device, candidates=self.cfg.candidates,
                                 dtype=self.cfg.dtype)
        t0 = time.perf_counter()
        train, valid = searcher.gather(train_q), searcher.gather(valid_q)
        gather_s = time.perf_counter() - t0
        booster, info = train_lambdamart(train, labels_for(train, grades), valid, labels_for(valid, grades),
                                         seed=self.cfg.seed)
        arrays = export_lightgbm(booster)
        out = self.cfg.work / "reranker"
        out.mkdir(exist_ok=True)
        np.savez(out / TREES_FILE, **arrays)
        info.update(gather_s=round(gather_s, 1), trees=int(len(arrays["tree_roots"])), nodes=int(len(arrays["node_feature"])))
        (out / "report.json").write_text(json.dumps(info, indent=2))
        return info

    def assemble(self) -> dict[str, Any]:
        out = self.cfg.out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(self.cfg.work / "stage", tmp)
        try:
            shutil.copy2(self.cfg.work / "reranker" / TREES_FILE, tmp / TREES_FILE)
            spec = {"type": "lambdamart", "features": list(FEATURE_NAMES), "trees_file": TREES_FILE,
                    "similar": similar_spec()}
            (tmp / bf.RERANKER_FILE).write_text(json.dumps(spec, indent=2))
            shutil.copy2(self.cfg.work / "prepared" / "aliases.json", tmp / "aliases.json")
            manifest = bf.read_manifest(tmp)
            manifest["reranker"] = {"file": bf.RERANKER_FILE, "type": "lambdamart", "features": list(FEATURE_NAMES),
                                    "training": self.notes.get("rerank", {})}
            manifest["data_report"] = self.notes.get("prepare", {})
            manifest["finetune"] = self.notes.get(f"finetune_{self.cfg.finetune.method}", {})
            manifest["parameters"] = {"finetune": asdict(self.cfg.finetune), "candidates": self.cfg.candidates,
                                      "positive_at": POSITIVE_AT, "splits": "by query: train 70% / rerank 15% / test 15%"}
            manifest["data_fingerprints"] = self.fingerprints()
            manifest = seal(tmp, manifest)
            if self.cfg.evaluate:
                t0 = time.perf_counter()
                from training.evaluate import evaluate_search, plot

                zs = np.load(self.cfg.work / "zero_shot.npy").astype(np.float32)
                results = evaluate_search(tmp, self.cfg.work / "prepared" / "test_judgments.csv",
                                          pretrained=self.cfg.pretrained, device=self.cfg.device, zero_shot=zs)
                (self.cfg.work / "evaluation.json").write_text(json.dumps(results, indent=2))
                plot(results, self.cfg.work / "evaluation.png")
                shutil.copy2(self.cfg.work / "evaluation.png", tmp / "evaluation.png")
                manifest["metrics"] = {"test": results}
                self.timings["evaluate"] = round(time.perf_counter() - t0, 1)
                self.tracker.table("evaluation/search_test", {k: v for k, v in results.items() if k != "meta"})
                for system, row in results.items():
                    if isinstance(row, dict) and system != "meta":
                        self.tracker.scalars(f"evaluation/{system}", row, 0)
            manifest["timings"] = {**manifest.get("timings", {}), "pipeline_s": self.timings}
            version = manifest["bundle_version"]
            manifest = seal(tmp, manifest)
            manifest["bundle_version"] = version  # the version that was evaluated: same serving files
            (tmp / bf.MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def run(self) -> dict[str, Any] | None:
        """Build the bundle; returns its manifest (None on data-parallel ranks other than 0, which write nothing
        and stop after their last collective step)."""
        if self.cfg.out.exists():
            raise FileExistsError(f"{self.cfg.out}: output directory already exists; choose a new path")
        d = dist.current()
        if d.main:
            return self._run()
        work, self.cfg.work = self.cfg.work, Path(tempfile.mkdtemp(prefix=f"searchrec-rank{d.rank}-"))
        try:
            return self._run()
        finally:
            shutil.rmtree(self.cfg.work, ignore_errors=True)
            self.cfg.work = work

    def _run(self) -> dict[str, Any] | None:
        fp = self.fingerprints()
        ft = asdict(self.cfg.finetune)
        encoder = f"encoder_{ft['method']}"
        self._step("prepare", {"inputs": fp}, self.prepare)
        # The precision is part of each encoding step's key: a work dir reused with another --dtype (or
        # on a CPU of the other kind, where auto resolves differently) encodes again.
        self._step("zero_shot", {"inputs": fp, "pretrained": str(self.cfg.pretrained), "dtype": self.cfg.dtype},
                   self.zero_shot, shared=True, needs=("prepared",), makes=("zero_shot.npy",))
        self._step("mine", {"inputs": fp}, self.mine, shared=True, needs=("prepared", "zero_shot.npy"),
                   makes=("negatives.json",))
        self._step(f"finetune_{ft['method']}", {"inputs": fp, "finetune": ft}, self.finetune, shared=True,
                   needs=("prepared", "negatives.json"))  # rank 0 saves the encoder; the stage step sends it
        self._step("stage", {"inputs": fp, "finetune": ft, "dtype": self.cfg.dtype}, self.stage, shared=True,
                   needs=("prepared", encoder))
        if not dist.current().main:
            return None  # the rest is rank 0's
        self._alone = True
        self._step("rerank", {"inputs": fp, "finetune": ft, "dtype": self.cfg.dtype, "candidates": self.cfg.candidates,
                              "features": list(FEATURE_NAMES)}, self.rerank)
        t0 = time.perf_counter()
        manifest = self.assemble()
        self.timings["assemble"] = round(time.perf_counter() - t0, 1)
        self.tracker.manifest(manifest)
        return manifest
