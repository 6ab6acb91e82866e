"""Behaviour-data preparation, splits, statistics and the recommend evaluation (small synthetic data;
the real Beauty and Online Retail files when ../shared/data is present)."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SAMPLE, data_dir
from training.behaviour import (co_occurrence, leave_one_out, load_beauty, load_interactions_csv, load_seqfile,
                                prepare_online_retail, repeat_rate, temporal_split)
from training.data import DataError

needs_data = pytest.mark.skipif(not data_dir().is_dir(), reason=f"real data not found at {data_dir()} (set SEARCHREC_DATA_DIR)")


def test_seqfile_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "seq.txt"
    f.write_text("1 10 11 12\n2\n3 10 13\n")
    with pytest.raises(DataError, match=r"seq\.txt:2: a user with no items"):
        load_seqfile(f)
    b = load_seqfile(f, on_error="drop")
    assert b.users == ["1", "3"] and b.report.dropped["a user with no items"] == 1
    assert b.sequences == [[0, 1, 2], [0, 3]]


def test_seqfile_duplicate_user_and_missing_file(tmp_path):
    f = tmp_path / "seq.txt"
    f.write_text("1 10 11\n1 12 13\n")
    with pytest.raises(DataError, match="appears twice"):
        load_seqfile(f)
    with pytest.raises(DataError, match="not found"):
        load_seqfile(tmp_path / "nope.txt")


def test_interactions_csv_errors(tmp_path):
    items = pd.read_json(SAMPLE / "catalog.jsonl", lines=True)
    f = tmp_path / "i.csv"
    f.write_text("user_id,item_id,timestamp\nu1,SR-00001,5\nu1,NOPE,6\nu2,SR-00002,x\n")
    with pytest.raises(DataError, match=r"i\.csv:3: item_id 'NOPE' is not in the catalog"):
        load_interactions_csv(f, items)
    b = load_interactions_csv(f, items, on_error="drop")
    assert b.users == ["u1"] and sum(b.report.dropped.values()) == 2
    f.write_text("user,item\n")
    with pytest.raises(DataError, match="header"):
        load_interactions_csv(f, items)


def test_leave_one_out_and_temporal_split():
    train, valid, test = leave_one_out([[0, 1, 2, 3], [4, 5]])
    assert train == [[1, 2], [5, 6]] and valid == [3, 0] and test == [4, 0]
    from training.behaviour import Behaviour
    from training.data import Report

    b = Behaviour(pd.DataFrame({"item_id": ["a", "b", "c"]}), ["u"], [[0, 1, 2]], [[10, 20, 30]], Report())
    assert temporal_split(b, 20) == ([[0]], [[1, 2]])


def test_co_occurrence_is_symmetric_and_sorted():
    indptr, idx, w = co_occurrence([[0, 1, 2], [1, 2], [3]], 4, window=2)
    m = np.zeros((4, 4))
    for a in range(4):
        nb = idx[indptr[a]:indptr[a + 1]]
        assert (np.diff(nb) > 0).all()
        m[a, nb] = w[indptr[a]:indptr[a + 1]]
    np.testing.assert_allclose(m, m.T)
    assert m[1, 2] > m[0, 2] > 0 and m[3].sum() == 0


def test_repeat_rate():
    assert repeat_rate([[1, 2, 1], [3]]) == pytest.approx(0.25)


def test_metrics_at():
    from training.evaluate_rec import metrics_at

    m = metrics_at([[5, 1, 2], [7, 8, 9]], [{1}, {4}], ks=(1, 3))
    assert m["recall@1"] == 0 and m["recall@3"] == 0.5
    assert m["ndcg@3"] == pytest.approx(0.5 / np.log2(3))


@needs_data
def test_beauty_loader_counts():
    b = load_beauty(data_dir())
    assert (len(b.users), len(b.items), b.n_interactions) == (22363, 12101, 198502)
    assert b.attributes is not None and b.report.counts["items_with_attributes"] > 10000


@needs_data
def test_online_retail_cleaning():
    b = prepare_online_retail(data_dir())
    d = b.report.dropped
    assert d["no customer id"] > 100_000 and d["cancellation row"] > 5_000
    assert d["purchase undone by a cancellation"] > 1_000 and d["non-product stock code"] > 0
    assert 4_000 < len(b.users) < 4_400 and 3_500 < len(b.items) < 3_800
    assert b.items["title"].str.len().min() > 0 and (b.items["price"] > 0).all()
    assert all(t == sorted(t) for t in b.times[:200])
    assert repeat_rate(b.sequences) > 0.05  # people re-buy here: repeats stay recommendable


def _seqfile(path, users=300, items=40, seed=0):
    # Users walk the items in order (i -> i+1) from a random start: learnable, unlike popularity.
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for u in range(users):
            start = rng.randrange(items)
            n = rng.randint(4, 9)
            fh.write(" ".join([f"user{u}"] + [f"i{(start + j) % items}" for j in range(n)]) + "\n")


def test_seqfile_build_and_served_evaluation(tmp_path):
    from training.__main__ import main

    f = tmp_path / "walk.txt"
    _seqfile(f)
    out, js = tmp_path / "bundle", tmp_path / "eval.json"
    assert main(["build", "--dataset", "seqfile", "--path", str(f), "--out", str(out), "--device", "cpu",
                 "--rec-minutes", "20", "--rec-epochs", "40", "--no-evaluate"]) == 0  # epochs decide, not the clock
    assert main(["evaluate", "recommend", "--bundle", str(out), "--dataset", "seqfile", "--path", str(f),
                 "--json", str(js), "--device", "cpu"]) == 0
    res = json.loads(js.read_text())
    for name in ("bundle", "popularity", "item_knn"):
        assert {"recall@5", "ndcg@5", "recall@10", "ndcg@10"} <= set(res[name])
    assert res["meta"]["users"] == 300 and res["meta"]["unknown_ids_returned"] == 0
    assert res["bundle"]["recall@10"] > 0.8 > res["popularity"]["recall@10"]


def test_served_feedback_becomes_training_data(tmp_path):
    """Events a server logged under its state dir join the next build (`--events STATE_DIR`)."""
    from server.state import Event, LiveState
    from training.__main__ import main

    state = LiveState(tmp_path / "state")
    state.record_events([Event("s1", "served-user", "SR-00001", 4, 1_790_000_000_000),
                         Event("s2", "served-user", "SR-00002", 1, 1_790_000_100_000),
                         Event("s3", "served-user", "GONE-1", 1, 1_790_000_200_000)])
    state.close()
    out = tmp_path / "bundle"
    assert main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--interactions", str(SAMPLE / "interactions.csv"),
                 "--events", str(tmp_path / "state"), "--out", str(out), "--device", "cpu",
                 "--rec-minutes", "20", "--rec-epochs", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_fingerprints"]["served_events"].startswith("2 of 3 events")
    users = pd.read_parquet(out / manifest["recommender"]["users"])["user_id"].tolist()
    assert "served-user" in users and manifest["recommender"]["user_count"] == 401
