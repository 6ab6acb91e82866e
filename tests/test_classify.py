"""Product classification (offline part): the taxonomy and its hierarchy constraint, the bundle, the CLI,
and `evaluate classify` against its two baselines, on a small synthetic catalog (a tiny build: 1 epoch)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from common.bundle_format import MANIFEST, checksum_tree
from training.__main__ import main as training_main
from training.classify import (SEP, ClassifyDataError, Taxonomy, autofill_threshold, ece, fit_temperature, nll,
                               read_catalog, softmax, split_of)

TREE = {
    "Toys > Vehicles > Trains": ["steam locomotive", "railway wagon", "track set", "train engine"],
    "Toys > Vehicles > Cars": ["racing car", "police car", "sports car", "toy truck"],
    "Toys > Puzzles": ["jigsaw puzzle", "puzzle board", "brain teaser", "floor puzzle"],
    "Garden > Tools > Spades": ["garden spade", "digging spade", "border spade", "steel shovel"],
    "Garden > Hoses": ["garden hose", "hose reel", "spray nozzle", "expandable hose"],
}
BRANDS = ["Acme", "Bolt", "Crest", "Delta", "Ember", "Fjord", "Gale", "Harbor", "Iris", "Jade"]


def synthetic_csv(path, rows_per_leaf: int = 40, seed: int = 0):
    rng = random.Random(seed)
    lines = ["item_id,title,category_path"]
    n = 0
    for leaf, words in TREE.items():
        for _ in range(rows_per_leaf):
            n += 1
            title = f"{rng.choice(BRANDS)} {rng.choice(words)} {rng.choice(['deluxe', 'mini', 'pro', 'classic'])} {n}"
            lines.append(f"{n},{title},{leaf}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classify")
    data = synthetic_csv(folder / "shop.csv")
    out = folder / "bundle"
    assert training_main(["build-classifier", "--data", str(data), "--out", str(out), "--epochs", "1",
                          "--max-minutes", "3", "--device", "cpu", "--dtype", "float32"]) == 0
    return data, out


def test_taxonomy_rolls_leaves_up_into_every_level():
    tax = Taxonomy.from_paths(TREE)
    assert tax.depth == 3 and tax.level_names[0] == ["Garden", "Toys"]
    probs = np.random.default_rng(0).dirichlet(np.ones(len(tax.leaves)), size=4)
    for lvl in range(tax.depth):
        rolled = tax.level_probs(probs, lvl)
        shallow = probs[:, tax.level_of_leaf[lvl] < 0].sum(1)  # leaves that end above this level
        assert np.allclose(rolled.sum(1) + shallow, 1.0)
    toys = tax.level_names[0].index("Toys")
    toy_leaves = [i for i, p in enumerate(tax.leaves) if p.startswith("Toys")]
    assert np.allclose(tax.level_probs(probs, 0)[:, toys], probs[:, toy_leaves].sum(1))


def test_build_writes_a_checksummed_bundle_whose_predictions_are_real_paths(built):
    from training.classifier_build import Classifier

    _data, out = built
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "classifier" and manifest["files"] == checksum_tree(out)
    assert not [p for p in out.rglob("*") if p.suffix in (".pkl", ".pickle", ".joblib")]  # no pickle
    clf = Classifier.load(out)
    texts = ["Acme steam locomotive pro", "Bolt garden hose mini", "a completely unrelated phrase", "x"]
    probs = clf.predict_proba(texts)
    assert probs.shape == (4, len(TREE)) and np.allclose(probs.sum(1), 1.0)
    for i in probs.argmax(1):
        assert clf.tax.leaves[i] in TREE  # the hierarchy constraint: always a whole, real path
    assert clf.tax.leaves[probs[0].argmax()] == "Toys > Vehicles > Trains"
    assert clf.tax.leaves[probs[1].argmax()] == "Garden > Hoses"
    meta = manifest["classifier"]
    assert 0.0 < meta["autofill_threshold"] <= 1.0 and meta["blend"]["temperature"] > 0


def test_evaluate_scores_ours_and_both_baselines_on_the_held_out_split(built, tmp_path):
    data, out = built
    report = tmp_path / "eval.json"
    assert training_main(["evaluate", "classify", "--bundle", str(out), "--data", str(data), "--json",
                          str(report)]) == 0
    res = json.loads(report.read_text())
    test_rows = sum(split_of(t) == "test" for t in read_catalog(data)["title"])
    for system in ("model", "tfidf_svm", "zero_shot"):
        r = res[system]
        assert r["rows"] == test_rows and 0 <= r["leaf_accuracy"] <= r["top_accuracy"] <= 1
        assert 0 <= r["macro_f1"] <= 1
    assert res["model"]["leaf_accuracy"] >= 0.9  # the words decide the leaf here
    assert {"ece", "autofill_precision", "autofill_coverage"} <= set(res["model"])
    assert report.with_suffix(".png").stat().st_size > 1000  # the per-level confusion plot


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,name\n1,x\n")
    assert training_main(["build-classifier", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "missing column(s) ['category_path', 'title']" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("item_id,title,category_path\n1,Drill,Tools > Drills\n2,  ,Tools > Drills\n")
    with pytest.raises(ClassifyDataError, match="row 3: empty title"):
        read_catalog(empty)
    exists = tmp_path / "exists"
    exists.mkdir()
    assert training_main(["build-classifier", "--data", str(empty), "--out", str(exists)]) == 2
    assert "exists" in capsys.readouterr().err
    assert training_main(["evaluate", "classify", "--bundle", str(tmp_path), "--data", str(empty)]) == 2


def test_calibration_helpers():
    # 200 confident predictions, all right, then 40 at 0.6 of which half are wrong: the threshold stops at 0.9.
    conf = np.concatenate([np.linspace(0.99, 0.9, 200), np.full(40, 0.6)])
    correct = np.concatenate([np.ones(200, bool), np.arange(40) % 2 == 0])
    assert autofill_threshold(conf, correct, 0.95) == pytest.approx(0.9)
    # Three right answers are not evidence of 95% precision (the lower bound, not the observed rate, decides).
    assert autofill_threshold(np.array([0.99, 0.95, 0.9]), np.ones(3, bool), 0.95) == 1.0
    # All right, but at a low confidence: the floor holds.
    assert autofill_threshold(np.full(500, 0.3), np.ones(500, bool), 0.95) == 0.5
    assert ece(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([True, False])) == pytest.approx(0.25)
    # Every dev row right: the likelihood alone would take the temperature to its lowest value (probabilities
    # of 1.0); the fitted one keeps the mean top probability within the Laplace-smoothed accuracy.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 39)
    logits = rng.normal(size=(39, 8))
    logits[np.arange(39), y] += 6
    t = fit_temperature(logits, y)
    assert t > 0.5 and softmax(logits / t).max(1).mean() <= 40 / 41
    # With errors the likelihood has a minimum, and that is the temperature.
    logits[:5, y[:5]] -= 12
    t = fit_temperature(logits, y)
    assert nll(softmax(logits / t), y) <= min(nll(softmax(logits / u), y) for u in (0.5 * t, 2 * t))
    assert SEP == " > "
