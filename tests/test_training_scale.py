"""Training at scale: two gloo processes under torchrun, resume after a kill, incremental updates from the
engine's event log, tracked runs and their comparison, and clear errors for a broken launch environment.

Every run here is bounded by epochs, not by the clock, so a slower machine trains the same models."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, SAMPLE

WORKER = ROOT / "tests" / "scale_worker.py"
TINY = ["--rec-dims", "16", "--rec-max-len", "12", "--rec-epochs", "6", "--rec-minutes", "20", "--device", "cpu",
        "--seed", "1"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _torchrun(n: int, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return _run(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args], **env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_args(out: Path, runs: Path) -> list[str]:
    return ["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--interactions", str(SAMPLE / "interactions.csv"),
            "--out", str(out), "--runs", str(runs), "--name", "scale", *TINY]


# --- two processes ------------------------------------------------------------------------------------------

def test_two_gloo_ranks_hold_identical_weights_after_every_step_and_the_loss_falls(tmp_path):
    proc = _torchrun(2, [str(WORKER), "steps", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) > 6  # the sampler gives both ranks the same number of steps
    assert [s["digest"] for s in r0["steps"]] == [s["digest"] for s in r1["steps"]]
    assert len({s["digest"] for s in r0["steps"]}) == len(r0["steps"])  # and they do change every step
    assert [s["loss"] for s in r0["steps"]] != [s["loss"] for s in r1["steps"]]  # each rank saw its own batches
    assert r0["epochs"][-1] < r0["epochs"][0] - 0.3  # epoch loss (all-reduced over ranks) falls
    assert r0["effective_batch_size"] == 32 and r0["per_rank_batch"] == 16


def test_a_two_process_build_is_written_by_rank_zero_alone_and_serves(tmp_path):
    from server.bundle import load_bundle

    runs = tmp_path / "runs"
    proc = _run(["-m", "training", *_build_args(tmp_path / "b", runs), "--nproc-per-node", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    rec = manifest["recommender"]
    assert rec["world_size"] == 2 and rec["effective_batch_size"] == 256 and rec["learning_rate"] == 0.003
    assert rec["training"]["epochs_run"] == 6
    assert [p.name for p in runs.iterdir()] and len(list(runs.iterdir())) == 1  # one run folder, one writer
    assert len(list(next(runs.iterdir()).glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.work", "runs"]  # no stray rank-1 output
    assert list((tmp_path / "b.work").iterdir()) == []  # the checkpoint is gone once the bundle is in place
    bundle = load_bundle(tmp_path / "b")  # the server's own loader checks every file and shape
    assert bundle.manifest["bundle_version"] == manifest["bundle_version"]


def test_two_ranks_fine_tune_the_encoder_as_one_process_does_on_the_same_batches(tmp_path):
    """Each rank encodes half of every batch; the gathered vectors make every rank's loss the whole batch's, so
    two processes x 4 queries take one process x 8's steps (a tiny BERT without dropout, fp32: same numbers)."""
    base = tmp_path / "base"
    assert _run([str(WORKER), "tiny-encoder", str(base)]).returncode == 0
    one = _run([str(WORKER), "finetune", str(base), str(tmp_path / "one"), "8"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, [str(WORKER), "finetune", str(base), str(tmp_path / "two"), "8"])
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "rank-0.json").read_text())
    r0, r1 = (json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert len(single["steps"]) == len(r0["steps"]) == len(r1["steps"]) == 8
    assert [s["digest"] for s in r0["steps"]] == [s["digest"] for s in r1["steps"]]  # in step after every step
    assert len({s["digest"] for s in r0["steps"]}) == 8  # and moving
    assert np.allclose([s["loss"] for s in r0["steps"]], [s["loss"] for s in single["steps"]], atol=1e-5)
    assert r0["steps"][-1]["loss"] < r0["steps"][0]["loss"] - 0.5
    assert np.allclose([h[1] for h in r0["report"]["history"]], [h[1] for h in single["report"]["history"]],
                       atol=1e-6)  # dev nDCG (each rank encodes half of the pool) as one process computes it
    rep = r0["report"]
    assert (rep["world_size"], rep["per_rank_batch"], rep["effective_batch"]) == (2, 4, 8)
    a = load_file(str(tmp_path / "one" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "encoder" / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k in start) > 1e-3


def test_a_two_process_search_build_fine_tunes_data_parallel_and_serves(tmp_path):
    from server.bundle import load_bundle

    runs, scratch = tmp_path / "runs", tmp_path / "scratch"
    scratch.mkdir()
    proc = _run(["-m", "training", "build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments",
                 str(SAMPLE / "judgments.csv"), "--out", str(tmp_path / "b"), "--runs", str(runs), "--max-steps", "4",
                 "--eval-every", "2", "--batch-size", "8", "--device", "cpu", "--nproc-per-node", "2"],
                TMPDIR=str(scratch))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ft = manifest["finetune"]
    assert (ft["world_size"], ft["per_rank_batch"], ft["effective_batch"], ft["lr"]) == (2, 4, 8, 3e-5)
    assert ft["steps"] == 4 and manifest["metrics"]["test"]["bundle"]["version"] == manifest["bundle_version"]
    assert len(list(runs.iterdir())) == 1  # one writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.work", "runs", "scratch"]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("searchrec-rank")]  # rank 1's folder gone
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest["bundle_version"] == manifest["bundle_version"]


def test_index_shares_merge_into_the_index_one_process_adds():
    import faiss

    from training.bundle_writer import merge_shards, shard_codes

    rng = np.random.default_rng(3)
    x = rng.normal(size=(6000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    trained = faiss.index_factory(16, "IVF64,PQ8x4fs", faiss.METRIC_INNER_PRODUCT)
    trained.train(x[:4000])
    blob = faiss.serialize_index(trained)
    whole = faiss.deserialize_index(blob)
    whole.add(x)
    parts = [range(0, 2500), range(2500, 4001), range(4001, 6000)]
    merged = merge_shards([shard_codes(blob, x, r) for r in parts], [r.start for r in parts])
    assert merged.ntotal == whole.ntotal == 6000
    for nprobe in (4, 64):  # some lists, and all of them: the same ids, codes and scores
        whole.nprobe = merged.nprobe = nprobe
        (d1, i1), (d2, i2) = whole.search(x[:300], 50), merged.search(x[:300], 50)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)


def test_two_ranks_add_their_shares_to_a_large_catalogs_ann_index(tmp_path):
    import faiss

    proc = _torchrun(2, [str(WORKER), "index", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    x = np.load(tmp_path / "vectors.npy")
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["type"] == "ivf_pq_refine" and index.ntotal == 5000
    faiss.extract_index_ivf(index).nprobe = params["nlist"]
    faiss.downcast_index(index).k_factor = 16
    found = index.search(x, 1)[1][:, 0]
    # Every vector (rank 0's share and rank 1's, whose ids were shifted in the merge) finds itself.
    assert (found == np.arange(5000)).mean() > 0.99


# --- checkpoints --------------------------------------------------------------------------------------------

def test_a_build_killed_mid_training_resumes_to_the_same_model(tmp_path):
    runs = tmp_path / "runs"
    whole = _run([str(WORKER), "build", "0", *_build_args(tmp_path / "whole", runs)])
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "resumed"
    killed = _run([str(WORKER), "build", "5", *_build_args(out, runs)])  # 2 steps an epoch: dies in epoch 3
    assert killed.returncode == -9
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".resumed")]
    assert (tmp_path / "resumed.work" / "recommender.ckpt").is_file()
    again = _run([str(WORKER), "build", "0", *_build_args(out, runs)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "after epoch 2" in again.stderr
    a = json.loads((tmp_path / "whole" / "manifest.json").read_text())["recommender"]
    b = json.loads((out / "manifest.json").read_text())["recommender"]
    assert b["training"]["resumed_after_epoch"] == 2
    # Same seed -> same run; multi-threaded CPU reductions may differ in the last float bits, so "the same"
    # is the third decimal for metrics and a tight tolerance for the losses and weights.
    assert np.allclose([h["loss"] for h in a["training"]["history"]], [h["loss"] for h in b["training"]["history"]],
                       rtol=0, atol=1e-4)
    assert round(a["valid_ndcg_model_only"], 3) == round(b["valid_ndcg_model_only"], 3)
    assert round(a["valid_ndcg_rescored"], 3) == round(b["valid_ndcg_rescored"], 3)
    wa, wb = load_file(str(tmp_path / "whole" / a["model"])), load_file(str(out / b["model"]))
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-3) for k in wa)


def test_a_fine_tuning_killed_mid_way_resumes_from_its_checkpoint_to_the_same_encoder(tmp_path):
    """Two ranks, checkpoint after each dev evaluation (steps 4 and 8 of 8); SIGKILL at step 6; the same command
    again resumes after step 4 (optimiser moments, schedule, batches and negatives where they were)."""
    base = tmp_path / "base"
    assert _run([str(WORKER), "tiny-encoder", str(base)]).returncode == 0
    whole = _torchrun(2, [str(WORKER), "finetune", str(base), str(tmp_path / "whole"), "8"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(2, [str(WORKER), "finetune", str(base), str(tmp_path / "cut"), "8", "6"])
    assert killed.returncode != 0 and (tmp_path / "cut" / "finetune.ckpt").is_file()
    assert not (tmp_path / "cut" / "encoder").exists()
    again = _torchrun(2, [str(WORKER), "finetune", str(base), str(tmp_path / "cut"), "8"])
    assert again.returncode == 0, again.stderr[-3000:]
    ref = json.loads((tmp_path / "whole" / "rank-0.json").read_text())
    res = json.loads((tmp_path / "cut" / "rank-0.json").read_text())
    assert res["report"]["resumed_at"] == 4 and [s["step"] for s in res["steps"]] == [5, 6, 7, 8]
    assert np.allclose([s["loss"] for s in res["steps"]], [s["loss"] for s in ref["steps"][4:]], atol=1e-5)
    assert np.allclose([h[1] for h in res["report"]["history"]], [h[1] for h in ref["report"]["history"]], atol=1e-6)
    a = load_file(str(tmp_path / "whole" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "encoder" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert not (tmp_path / "cut" / "finetune.ckpt").exists()  # removed once the encoder is saved


def test_a_classifier_build_killed_mid_way_resumes_after_its_last_epoch(tmp_path):
    from tests.test_classify import synthetic_csv

    data = synthetic_csv(tmp_path / "shop.csv")

    def args(out):
        return ["build-classifier", "--data", str(data), "--out", str(tmp_path / out), "--epochs", "3",
                "--max-minutes", "10", "--device", "cpu", "--dtype", "float32", "--no-track"]

    whole = _run([str(WORKER), "classify", "0", *args("whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _run([str(WORKER), "classify", "3", *args("cut")])  # dies after epoch 3's training, before its end
    assert killed.returncode != 0 and (tmp_path / "cut.work" / "classifier.ckpt").is_file()
    assert not (tmp_path / "cut").exists()
    again = _run(["-m", "training", *args("cut")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumes after epoch 2" in again.stderr
    ref = json.loads((tmp_path / "whole" / "manifest.json").read_text())["classifier"]["metrics"]["dense"]["epochs"]
    res = json.loads((tmp_path / "cut" / "manifest.json").read_text())["classifier"]["metrics"]["dense"]["epochs"]
    assert [e["epoch"] for e in res] == [1, 2, 3]  # the resumed build's history holds the epochs before the kill
    assert np.allclose([e["loss"] for e in res], [e["loss"] for e in ref], atol=1e-4)
    assert [round(e["dev_leaf_accuracy"], 3) for e in res] == [round(e["dev_leaf_accuracy"], 3) for e in ref]
    a = load_file(str(tmp_path / "whole" / "classifier" / "head.safetensors"))
    b = load_file(str(tmp_path / "cut" / "classifier" / "head.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    assert not (tmp_path / "cut.work").exists()  # the checkpoint is gone once the classifier is written


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    from training.recommender import SeqRecConfig, train_seqrec
    from tests.scale_worker import tiny_split

    ckpt = tmp_path / "c.ckpt"
    cfg = SeqRecConfig(dims=16, max_len=12, layers=1, heads=1, batch_size=32, max_epochs=2, eval_every=1)
    train_seqrec(tiny_split(), cfg, checkpoint=ckpt)
    other = SeqRecConfig(**{**cfg.__dict__, "lr": 1e-3})
    _, report = train_seqrec(tiny_split(), other, checkpoint=ckpt)
    assert report["resumed_after_epoch"] is None and report["epochs_run"] == 2
    _, same = train_seqrec(tiny_split(), other, checkpoint=ckpt)  # its own checkpoint: finished, nothing to do
    assert same["resumed_after_epoch"] == 2


# --- incremental update -------------------------------------------------------------------------------------

def _log_events(state: Path, events: list[dict]) -> None:
    from common.eventlog import EventLog

    log = EventLog(state, fsync=False)
    for i in range(0, len(events), 4):
        log.append({"kind": "feedback", "events": events[i:i + 4]})
    log.close()


def test_update_learns_the_logged_events_into_a_new_version_the_server_loads(sample_bundle, tmp_path):
    from server.bundle import load_bundle

    old = json.loads((sample_bundle / "manifest.json").read_text())
    df = pd.read_csv(SAMPLE / "interactions.csv")
    after = int(df["timestamp"].max())
    items = df["item_id"].unique().tolist()
    events = [{"event_id": f"e{i}", "user_id": f"U{i % 7 + 1:04d}" if i % 5 else "NEWCOMER", "item_id": items[i % 60],
               "type": 4, "timestamp_ms": (after + 60 + i) * 1000, "query": "", "position": 0} for i in range(80)]
    events.append({"event_id": "old", "user_id": "U0001", "item_id": items[0], "type": 4,
                   "timestamp_ms": (after - 10) * 1000})  # before the bundle's data ends: already learnt
    events.append({"event_id": "ghost", "user_id": "U0001", "item_id": "NOT-IN-CATALOG", "type": 4,
                   "timestamp_ms": (after + 5000) * 1000})
    _log_events(tmp_path / "state", events)
    runs = tmp_path / "runs"
    proc = _run(["-m", "training", "update", "--bundle", str(sample_bundle), "--events", str(tmp_path / "state"),
                 "--out", str(tmp_path / "new"), "--epochs", "4", "--runs", str(runs), "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "new" / "manifest.json").read_text())
    u = m["update"]
    assert m["parent_version"] == old["bundle_version"] != m["bundle_version"]
    assert (u["events_logged"], u["events_after_since"], u["events_used"], u["events_unknown_item"]) == (82, 81, 80, 1)
    assert u["new_users"] == 1 and u["users_touched"] == 8
    assert m["recommender"]["training"]["warm_start"] and m["recommender"]["training"]["epochs_run"] <= 4
    assert m["recommender"]["user_count"] == old["recommender"]["user_count"] + 1
    assert m["recommender"]["data_until"] == after + 60 + 79
    b = load_bundle(tmp_path / "new")
    rec = b.rec
    newcomer = rec.user_index["NEWCOMER"]
    row = {i: r for r, i in enumerate(b.items.ids)}
    assert rec.history(newcomer).tolist() == [row[items[i % 60]] for i in range(0, 80, 5)]
    old_vec = np.load(sample_bundle / old["recommender"]["vectors"])
    new_vec = np.load(tmp_path / "new" / m["recommender"]["vectors"])
    assert old_vec.shape == new_vec.shape and not np.allclose(old_vec, new_vec)  # it learnt
    assert np.corrcoef(old_vec.ravel(), new_vec.ravel())[0, 1] > 0.8  # from where it was (a warm start)
    # A second update from the new version finds nothing newer than what it learnt: a clear error, no bundle.
    again = _run(["-m", "training", "update", "--bundle", str(tmp_path / "new"), "--events", str(tmp_path / "state"),
                  "--out", str(tmp_path / "newer"), "--no-track", "--device", "cpu"])
    assert again.returncode == 2 and "nothing to learn" in again.stderr and not (tmp_path / "newer").exists()
    # Tracked: the compare command puts the build's and the update's settings side by side.
    cmp = _run(["-m", "training", "compare", str(next(runs.iterdir())), str(next(runs.iterdir())),
                "--runs", str(runs)])
    assert cmp.returncode == 0 and "recommender/train/loss (last)" in cmp.stdout


# --- tracking -----------------------------------------------------------------------------------------------

def test_compare_prints_two_runs_settings_and_metrics_side_by_side(tmp_path):
    from training.tracking import Tracker, compare

    for name, lr, losses in (("a", 0.003, [3.0, 2.0]), ("b", 0.001, [3.0, 2.5])):
        t = Tracker(tmp_path / name)
        for step, loss in enumerate(losses, 1):
            t.scalar("recommender/train/loss", loss, step)
            t.scalar("recommender/valid/ndcg@10", 1 / loss, step)
        t.manifest({"name": name, "recommender": {"config": {"lr": lr, "dims": 64}, "valid_ndcg_rescored": 1 / loss},
                    "files": {"x": "y"}})
        t.close()
    text = compare(tmp_path / "a", tmp_path / "b")
    assert any("recommender.config.lr" in ln and "0.0030" in ln and "0.0010" in ln and ln.endswith("*")
               for ln in text.splitlines())
    assert any("recommender.config.dims" in ln and not ln.endswith("*") for ln in text.splitlines())
    assert any("recommender/train/loss (last)" in ln and "2.0000" in ln and "2.5000" in ln for ln in text.splitlines())
    assert any("recommender/valid/ndcg@10 (best)" in ln and "0.5000" in ln and "0.4000" in ln for ln in text.splitlines())
    assert any("recommender.valid_ndcg_rescored" in ln for ln in text.splitlines())
    assert "files" not in text
    proc = _run(["-m", "training", "compare", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert proc.returncode == 2 and "missing" in proc.stderr


# --- launch errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
])
def test_an_inconsistent_launch_environment_is_a_clear_error(tmp_path, env, says):
    proc = _run(["-m", "training", *_build_args(tmp_path / "b", tmp_path / "runs")], **env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and not (tmp_path / "b").exists()


def test_a_rank_that_cannot_reach_the_others_fails_clearly(tmp_path):
    port = _free_port()  # nobody listens there: rank 1 waits for a rank 0 that never comes
    proc = _run(["-m", "training", *_build_args(tmp_path / "b", tmp_path / "runs")], timeout=120, RANK="1",
                WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                SEARCHREC_DIST_TIMEOUT_S="4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"rank 1 of 2 could not reach the other ranks at 127.0.0.1:{port} within 4 s" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_nproc_per_node_is_checked(tmp_path):
    proc = _run(["-m", "training", *_build_args(tmp_path / "b", tmp_path / "runs"), "--nproc-per-node", "0"])
    assert proc.returncode == 2 and "--nproc-per-node 0: must be at least 1" in proc.stderr


def test_a_two_process_classifier_build_trains_data_parallel_and_rank_zero_writes(tmp_path):
    from tests.test_classify import synthetic_csv
    from training.classifier_build import check_classifier

    data = synthetic_csv(tmp_path / "shop.csv")
    runs, out = tmp_path / "runs", tmp_path / "clf"
    proc = _run(["-m", "training", "build-classifier", "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--max-minutes", "5", "--device", "cpu", "--dtype", "float32", "--runs", str(runs),
                 "--nproc-per-node", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = check_classifier(out)  # every file there and matching its checksum
    dense = manifest["classifier"]["metrics"]["dense"]
    assert (dense["world_size"], dense["per_rank_batch"], dense["batch_size"]) == (2, 16, 32)
    epochs = dense["epochs"]
    assert len(epochs) == 2 and epochs[1]["loss"] < epochs[0]["loss"]
    assert epochs[0]["rows"] == 163  # the two ranks' rows of the epoch, summed: every training row once
    assert manifest["classifier"]["metrics"]["test"]["leaf_accuracy"] >= 0.8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "runs", "shop.csv"]  # nothing else, no rank 1 output
    assert len(list(runs.iterdir())) == 1
