"""The offline pipeline on a tiny dataset (the sample catalog + judgments): every step, end to end.

Data preparation, metrics and the Home Depot loader have their own unit tests; the real-data test
skips with a message where ../shared/data is absent.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, data_dir
from training import data as D
from training.__main__ import main as training_main
from training.metrics import ndcg_at, recall_at


# --- cleaning and validation -------------------------------------------------------------------

def test_clean_text_repairs_encoding_markup_and_unicode():
    assert D.clean_text("Caf\u00c3\u00a9 Table") == "Café Table"  # UTF-8 read as latin-1
    assert D.clean_text("Briggs &amp; Stratton <b>Engine</b>") == "Briggs & Stratton Engine"
    assert D.clean_text("ＤｅＷａｌｔ\u00a0 drill\x07") == "DeWalt drill"
    assert D.clean_text("plain 1/2 in. pipe") == "plain 1/2 in. pipe"


def test_query_split_is_deterministic_and_roughly_proportional():
    queries = [f"query {i}" for i in range(3000)]
    splits = [D.query_split(q) for q in queries]
    assert splits == [D.query_split(q) for q in queries]
    share = {s: splits.count(s) / len(splits) for s in D.SPLITS}
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["test"] - 0.15) < 0.03


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_homedepot_shape_loader_cleans_dedupes_and_remaps(tmp_path):
    root = tmp_path / "homedepot"
    root.mkdir()
    _write(root / "products.csv", "product_uid,title\n1,Cordless Drill &amp; Kit\n2,cordless  drill & kit\n3,Hammer\n")
    _write(root / "judgments.csv", "query,product_uid,relevance\ndrill,2,3\ndrill,1,2\nhammer,3,2.67\n")
    p = D.prepare_homedepot(tmp_path)
    assert p.items["item_id"].tolist() == ["1", "3"]
    assert p.aliases == {"2": "1"}
    drill = p.judgments[p.judgments["query"] == "drill"]
    assert drill["item_id"].tolist() == ["1"] and drill["relevance"].tolist() == [2.5]  # merged grades
    assert p.report.dropped["near_duplicate_title"] == 1


@pytest.mark.parametrize("judgments,needle", [
    ("query,product_uid,relevance\ndrill,99,3\n", "judgments.csv:2: unknown product_uid '99'"),
    ("query,product_uid,relevance\ndrill,1,4\n", "judgments.csv:2: relevance '4' outside 1..3"),
    ("query,product_uid,relevance\n ,1,3\n", "judgments.csv:2: empty query"),
    ("query,uid,relevance\ndrill,1,3\n", "header lacks column(s) ['product_uid']"),
])
def test_bad_judgment_rows_fail_with_file_and_row_or_are_dropped(tmp_path, judgments, needle):
    root = tmp_path / "homedepot"
    root.mkdir()
    _write(root / "products.csv", "product_uid,title\n1,Cordless Drill\n2,Hammer\n")
    _write(root / "judgments.csv", judgments + "hammer,2,3\n")
    with pytest.raises(D.DataError) as info:
        D.prepare_homedepot(tmp_path, on_error="fail")
    assert needle in str(info.value)
    if "header" not in needle:
        p = D.prepare_homedepot(tmp_path, on_error="drop")
        assert len(p.judgments) == 1 and sum(p.report.dropped.values()) == 1


def test_empty_title_and_missing_data_dir(tmp_path):
    root = tmp_path / "homedepot"
    root.mkdir()
    _write(root / "products.csv", "product_uid,title\n1,\n")
    _write(root / "judgments.csv", "query,product_uid,relevance\n")
    with pytest.raises(D.DataError, match="products.csv:2: empty title"):
        D.prepare_homedepot(tmp_path)
    with pytest.raises(D.DataError, match="data directory not found"):
        D.prepare_homedepot(tmp_path / "nope")


def test_latin1_file_is_read_and_repaired(tmp_path):
    root = tmp_path / "homedepot"
    root.mkdir()
    (root / "products.csv").write_bytes("product_uid,title\n1,Café Table\n".encode("latin-1"))
    _write(root / "judgments.csv", "query,product_uid,relevance\ntable,1,3\n")
    assert D.prepare_homedepot(tmp_path).items["title"].tolist() == ["Café Table"]


# --- metrics -----------------------------------------------------------------------------------

def test_ndcg_and_recall_on_hand_computed_cases():
    gains = {"a": 2.0, "b": 1.0, "c": 0.0}
    assert ndcg_at(["a", "b", "x"], gains) == pytest.approx(1.0)
    swapped = (1 / 1 + 2 / math.log2(3)) / (2 / 1 + 1 / math.log2(3))
    assert ndcg_at(["b", "a"], gains) == pytest.approx(swapped)
    assert ndcg_at(["x", "y"], gains) == 0.0 and ndcg_at(["a"], {"a": 0.0}) == 0.0
    assert recall_at(["a", "x", "b"], ["a", "b", "c"], k=2) == pytest.approx(1 / 3)


# --- the whole pipeline on the sample data -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "bundle"
    rc = training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments", str(SAMPLE / "judgments.csv"),
                        "--out", str(out), "--max-steps", "6", "--eval-every", "3", "--batch-size", "8",
                        "--device", "cpu"])
    assert rc == 0
    return out


def test_pipeline_writes_a_complete_evaluated_bundle(tiny_build):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert manifest["reranker"]["type"] == "lambdamart"
    assert manifest["finetune"]["steps"] >= 1 and manifest["finetune"]["method"] == "full"
    test = manifest["metrics"]["test"]
    for system in ("bundle", "bm25", "zero_shot"):
        assert set(test[system]) >= {"ndcg@10", "recall@100", "judged_ndcg@10", "latency_ms"}
        assert 0.0 <= test[system]["ndcg@10"] <= 1.0
    assert test["bundle"]["version"] == manifest["bundle_version"]
    assert set(manifest["timings"]["pipeline_s"]) >= {"prepare", "zero_shot", "mine", "finetune_full", "stage", "rerank"}
    assert manifest["data_fingerprints"]["judgments"].startswith("sha256:")
    assert (tiny_build / "evaluation.png").stat().st_size > 1000


def test_the_build_runs_and_records_the_precision_of_its_cpu_kind(tiny_build):
    # --dtype auto: bf16 where this run treats the CPU as having native bf16 (--cpu-kind, SEARCHREC_CPU_BF16
    # or its flags), fp32 elsewhere -- for fine-tuning and the catalog vectors. The evaluated server runs
    # the serving default, ONNX Runtime int8 on either kind, and says so.
    from common.cpu import cpu_flags, cpu_supports_bf16

    manifest = json.loads((tiny_build / "manifest.json").read_text())
    dtype = "bfloat16" if cpu_supports_bf16() else "float32"
    assert manifest["finetune"]["precision"] == ("bfloat16 autocast" if dtype == "bfloat16" else "float32")
    encoded = manifest["encoder"]["catalog_encoding"]
    assert (encoded["dtype"], encoded["native_bf16"], encoded["cpu_flags"]) == (dtype, cpu_supports_bf16(), cpu_flags())
    served = manifest["metrics"]["test"]["bundle"]
    assert (served["backend"], served["dtype"], served["cpu_flags"]) == ("onnx", "int8", cpu_flags())


@pytest.mark.parametrize("dtype, bf16", [("float32", False), ("bfloat16", True)])
def test_the_cli_precision_and_seed_reach_fine_tuning(tmp_path, dtype, bf16):
    from training.__main__ import _parser, _pipeline

    args = _parser().parse_args(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments",
                                 str(SAMPLE / "judgments.csv"), "--out", str(tmp_path / "b"), "--device", "cpu",
                                 "--dtype", dtype, "--seed", "7"])
    cfg = _pipeline(args, tmp_path / "b", tmp_path / "w").cfg
    assert cfg.dtype == dtype and cfg.finetune.bf16 is bf16  # before, a bf16 CPU fine-tuned in bf16 whatever --dtype said
    assert cfg.seed == cfg.finetune.seed == 7


def test_pipeline_bundle_is_served_and_verified(tiny_build):
    from server.bundle import load_bundle

    b = load_bundle(tiny_build)
    assert b.reranker.kind == "lambdamart" and len(b.reranker.trees["tree_roots"]) >= 1


def test_pipeline_steps_are_restartable(tiny_build):
    work = tiny_build.parent / "bundle.work"
    markers = sorted(p.name for p in work.glob("*.done.json"))
    steps = ("prepare", "zero_shot", "mine", "finetune_full", "stage", "rerank")
    assert markers == sorted(f"{s}.done.json" for s in steps)
    # A second run over the same work directory skips every finished step.
    rc = training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments", str(SAMPLE / "judgments.csv"),
                        "--out", str(tiny_build.parent / "again"), "--work", str(work), "--max-steps", "6",
                        "--eval-every", "3", "--batch-size", "8", "--device", "cpu", "--no-evaluate"])
    assert rc == 0
    manifest = json.loads((tiny_build.parent / "again" / "manifest.json").read_text())
    assert all(v == 0.0 for k, v in manifest["timings"]["pipeline_s"].items() if k != "assemble")


def test_a_work_dir_reused_with_another_precision_encodes_again(tiny_build):
    # The first build ran --dtype auto; the other precision must not reuse its vectors or its fine-tuning.
    import shutil

    from common.cpu import cpu_supports_bf16

    work = tiny_build.parent / "bundle.work.copy"  # a copy: the other tests' work directory stays as built
    shutil.copytree(tiny_build.parent / "bundle.work", work)
    other = "float32" if cpu_supports_bf16() else "bfloat16"
    out = tiny_build.parent / f"again-{other}"
    rc = training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments", str(SAMPLE / "judgments.csv"),
                        "--out", str(out), "--work", str(work), "--max-steps", "6", "--eval-every", "3",
                        "--batch-size", "8", "--device", "cpu", "--dtype", other, "--no-evaluate"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    ran = {k for k, v in manifest["timings"]["pipeline_s"].items() if v > 0.0}
    assert {"zero_shot", "finetune_full", "stage", "rerank"} <= ran and not {"prepare", "mine"} & ran
    assert manifest["encoder"]["catalog_encoding"]["dtype"] == other


def test_evaluate_cli_writes_json_and_plot(tiny_build, tmp_path):
    out_json, out_png = tmp_path / "e.json", tmp_path / "e.png"
    rc = training_main(["evaluate", "search", "--bundle", str(tiny_build), "--judgments", str(SAMPLE / "judgments.csv"),
                        "--json", str(out_json), "--plot", str(out_png), "--device", "cpu",
                        "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert {"bundle", "bm25", "zero_shot"} <= set(result)
    assert result["bundle"]["ndcg@10"] > 0.5 and out_png.stat().st_size > 1000


def test_pipeline_refuses_bad_input_and_leaves_nothing(tmp_path, capsys):
    bad = _write(tmp_path / "j.csv", "query,item_id,relevance\ndrill,NOPE,3\n")
    rc = training_main(["build", "--catalog", str(SAMPLE / "catalog.jsonl"), "--judgments", str(bad),
                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and "j.csv:2: unknown item_id 'NOPE'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    rc = training_main(["build", "--dataset", "homedepot", "--data-dir", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out2")])
    assert rc == 2 and "data directory not found" in capsys.readouterr().err


# --- real data ---------------------------------------------------------------------------------

def test_homedepot_preparation_on_real_data():
    root = data_dir()
    if not (root / "homedepot" / "products.csv").is_file():
        pytest.skip(f"Home Depot data not found under {root} (set SEARCHREC_DATA_DIR)")
    p = D.prepare_homedepot(root)
    assert 50_000 < len(p.items) <= 54_667
    assert not p.items["title"].str.contains("&amp;").any()
    assert p.judgments["item_id"].isin(set(p.items["item_id"])).all()
    assert set(p.judgments["split"]) == set(D.SPLITS)
    per_query = p.judgments.groupby("query")["split"].nunique()
    assert (per_query == 1).all(), "a query's judgments all fall in one split"
