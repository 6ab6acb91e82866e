"""Data preparation: load real catalogs and judgments, clean them, validate them, split by query, report.

Cleaning: mojibake repaired (text that was latin-1 in origin and decoded twice), HTML markup and
entities stripped, Unicode NFKC and whitespace normalised; exact duplicates (same item_id) and near
duplicates (same normalised title) dropped, with judgments of a dropped near duplicate moved to the
item kept. Validation: a malformed row is either an error naming the file and row (`on_error="fail"`)
or dropped and counted (`on_error="drop"`). The report says what was read, dropped and why.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.text import has_control_chars
from training.catalog import COLUMNS, CatalogError, load_catalog

_TAG = re.compile(r"<[^>]{0,200}>")
_MOJIBAKE = re.compile("[ÂÃâ][\u0080-\u00bf€™œžŸ‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜š›]")
SPLITS = ("train", "rerank", "test")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the row and the problem."""


@dataclass
class Report:
    """What preparation read, kept and dropped (and why)."""

    counts: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, where)

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "dropped": dict(self.dropped), "first_example": self.examples}


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 bytes that were decoded as latin-1/cp1252 (e.g. 'Ã©' -> 'é'); leave clean text alone."""
    if not _MOJIBAKE.search(text):
        return text
    for codec in ("cp1252", "latin-1"):
        try:
            return text.encode(codec).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
    return text


def clean_text(text: str) -> str:
    """Repair encoding, strip markup and entities, NFKC-normalise, collapse whitespace (case kept)."""
    text = fix_mojibake(text)
    text = html.unescape(_TAG.sub(" ", text))
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


def near_duplicate_key(title: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", title.lower()))


def query_split(query: str, fractions: tuple[float, float] = (0.70, 0.15)) -> str:
    """Deterministic split by query text: train 70%, rerank 15%, test 15% (same query, same split)."""
    h = int(hashlib.sha256(query.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < fractions[0]:
        return "train"
    return "rerank" if h < fractions[0] + fractions[1] else "test"


def _read_csv_rows(path: Path, required: tuple[str, ...]):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the Home Depot originals are latin-1; cleaning repairs the rest
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {missing}; expected {list(required)}")
    for n, row in enumerate(reader, start=2):
        yield n, row


def dedupe(items: pd.DataFrame, report: Report) -> tuple[pd.DataFrame, dict[str, str]]:
    """Drop near-duplicate titles, keeping the first; returns the items and a dropped->kept id map."""
    keys = items["title"].map(near_duplicate_key)
    first = {}
    remap = {}
    keep = []
    for item_id, key in zip(items["item_id"], keys):
        if key in first:
            remap[item_id] = first[key]
            report.drop("near_duplicate_title", item_id)
            keep.append(False)
        else:
            first[key] = item_id
            keep.append(True)
    return items[keep].reset_index(drop=True), remap


def load_homedepot_products(path: Path, report: Report, on_error: str = "fail") -> pd.DataFrame:
    """products.csv (product_uid,title) -> catalog DataFrame in the project's Item columns."""
    records, seen = [], set()
    for n, row in _read_csv_rows(path, ("product_uid", "title")):
        report.counts["products_read"] += 1
        where = f"{path}:{n}"
        uid = (row.get("product_uid") or "").strip()
        title = clean_text(row.get("title") or "")
        problem = None
        if not uid:
            problem = "empty product_uid"
        elif uid in seen:
            problem = "duplicate product_uid"
        elif not title:
            problem = "empty title"
        if problem:
            if on_error == "fail":
                raise DataError(f"{where}: {problem}")
            report.drop(problem.replace(" ", "_"), where)
            continue
        if title != " ".join((row.get("title") or "").split()):
            report.counts["titles_cleaned"] += 1
        seen.add(uid)
        records.append({"item_id": uid, "title": title, "description": "", "category": "", "brand": "",
                        "price": math.nan, "in_stock": True, "attributes": "{}"})
    if not records:
        raise DataError(f"{path}: no usable products")
    report.counts["missing_brand_category_price"] = len(records)  # flagged: Home Depot has titles only
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def load_judgments(path: Path, known: set[str], remap: dict[str, str], report: Report,
                   on_error: str = "fail", id_column: str = "product_uid") -> pd.DataFrame:
    """query,<id>,relevance (1..3) -> DataFrame(query, item_id, relevance, split)."""
    rows = []
    for n, row in _read_csv_rows(path, ("query", id_column, "relevance")):
        report.counts["judgments_read"] += 1
        where = f"{path}:{n}"
        query = clean_text(row.get("query") or "")
        uid = (row.get(id_column) or "").strip()
        problem = None
        try:
            rel = float(row.get("relevance") or "nan")
        except ValueError:
            rel = math.nan
        if not query:
            problem = "empty query"
        elif has_control_chars(row.get("query") or ""):
            problem = "control characters in query"
        elif not (1.0 <= rel <= 3.0):
            problem = f"relevance {row.get('relevance')!r} outside 1..3"
        elif uid not in known and uid not in remap:
            problem = f"unknown {id_column} {uid!r}"
        if problem:
            if on_error == "fail":
                raise DataError(f"{where}: {problem}")
            report.drop(problem.split(" '")[0].split(" ")[0] + "_" + problem.split(" ")[1], where)
            continue
        rows.append((query, remap.get(uid, uid), rel))
    df = pd.DataFrame(rows, columns=["query", "item_id", "relevance"])
    before = len(df)
    # A near-duplicate merge can judge one item twice for a query: keep the mean grade.
    df = df.groupby(["query", "item_id"], as_index=False, sort=False)["relevance"].mean()
    if before - len(df):
        report.counts["judgments_merged"] = before - len(df)
    df["split"] = df["query"].map(query_split)
    for split in SPLITS:
        report.counts[f"queries_{split}"] = int(df.loc[df.split == split, "query"].nunique())
    report.counts["judgments_kept"] = len(df)
    return df


@dataclass
class Prepared:
    items: pd.DataFrame
    judgments: pd.DataFrame | None
    report: Report
    aliases: dict[str, str] = field(default_factory=dict)  # dropped near-duplicate id -> kept id


def prepare_homedepot(data_dir: Path, on_error: str = "fail") -> Prepared:
    root = Path(data_dir) / "homedepot"
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data directory not found (set --data-dir or SEARCHREC_DATA_DIR)")
    if not root.is_dir():
        raise DataError(f"{root}: no homedepot folder in the data directory")
    report = Report()
    items = load_homedepot_products(root / "products.csv", report, on_error)
    items, remap = dedupe(items, report)
    judgments = load_judgments(root / "judgments.csv", set(items["item_id"]), remap, report, on_error)
    report.counts["items_kept"] = len(items)
    return Prepared(items, judgments, report, remap)


def prepare_catalog(catalog: Path, judgments: Path | None = None, on_error: str = "fail") -> Prepared:
    """The project's own catalog format, optionally with judgments (query,item_id,relevance)."""
    report = Report()
    try:
        items = load_catalog(catalog)
    except CatalogError as exc:
        raise DataError(str(exc)) from exc
    report.counts["products_read"] = len(items)
    for col in ("title", "description"):
        items[col] = items[col].map(clean_text)
    items, remap = dedupe(items, report)
    report.counts["items_kept"] = len(items)
    judged = None
    if judgments is not None:
        judged = load_judgments(judgments, set(items["item_id"]), remap, report, on_error, id_column="item_id")
    return Prepared(items, judged, report, remap)


def write_prepared(prepared: Prepared, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prepared.items.to_parquet(out / "items.parquet", index=False)
    if prepared.judgments is not None:
        prepared.judgments.to_parquet(out / "judgments.parquet", index=False)
    (out / "data_report.json").write_text(json.dumps(prepared.report.as_dict(), indent=2))
    (out / "aliases.json").write_text(json.dumps(prepared.aliases))
