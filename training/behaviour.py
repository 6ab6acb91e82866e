"""Behaviour logs -> per-user, time-ordered item sequences over a catalog.

Sources (each with the same report and error rules as `training.data`):
- a sequence file of the Amazon Beauty shape (`user item item ...` per line, oldest first);
- the raw UCI Online Retail parquet (cancellations and the purchases they cancel, non-product stock
  codes, non-positive quantities/prices and rows without a customer are dropped; one description per
  stock code; a catalog with median prices comes out);
- an interactions CSV `user_id,item_id,timestamp[,type]` over a catalog of the project's format;
- the server's own event log (`common.eventlog`), so served feedback trains the next bundle.

Splits: leave-one-out (last = test, second-to-last = validation) and temporal (a cut-off date).
"""
from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from training.data import DataError, Report, clean_text

PRODUCT_CODE = re.compile(r"^\d{5}[A-Za-z]{0,2}$")  # Online Retail product stock codes: 5 digits (+ variant letters)


@dataclass
class Behaviour:
    """Users' item sequences (rows into `items`, oldest first) with optional unix-second times."""

    items: pd.DataFrame  # project catalog columns; row i <-> item row i
    users: list[str]
    sequences: list[list[int]]
    times: list[list[int]] | None
    report: Report
    attributes: list[list[int]] | None = None  # per item row: attribute ids (0-based), or None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


def _catalog_frame(ids: list[str], titles: list[str], prices: list[float] | None = None,
                   categories: list[str] | None = None) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({
        "item_id": ids, "title": titles, "description": [""] * n,
        "category": categories or [""] * n, "brand": [""] * n,
        "price": prices if prices is not None else [float("nan")] * n,
        "in_stock": [True] * n,
    })


def load_seqfile(path: Path, on_error: str = "fail", titles: dict[str, str] | None = None) -> Behaviour:
    """`user item item ...` per line (whitespace separated, oldest first). Items become the catalog."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sequence file not found")
    report = Report()
    item_row: dict[str, int] = {}
    users: list[str] = []
    seqs: list[list[int]] = []
    seen_users: set[str] = set()
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                where = f"{path}:{lineno}"
                report.counts["lines_read"] += 1
                if not parts:
                    report.drop("empty line", where)
                    continue
                problem = None
                if len(parts) < 2:
                    problem = "a user with no items"
                elif parts[0] in seen_users:
                    problem = f"user {parts[0]!r} appears twice"
                elif any(len(p) > 256 for p in parts):
                    problem = "an id longer than 256 characters"
                if problem:
                    if on_error == "fail":
                        raise DataError(f"{where}: {problem} (use --on-error drop to skip such lines)")
                    report.drop(problem, where)
                    continue
                seen_users.add(parts[0])
                users.append(parts[0])
                seqs.append([item_row.setdefault(p, len(item_row)) for p in parts[1:]])
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not users:
        raise DataError(f"{path}: no usable lines")
    ids = list(item_row)
    names = [titles.get(i, f"item {i}") if titles else f"item {i}" for i in ids]
    report.counts.update(users=len(users), items=len(ids), interactions=sum(map(len, seqs)))
    return Behaviour(_catalog_frame(ids, names), users, seqs, None, report, source=str(path))


def load_beauty(data_dir: Path, on_error: str = "fail") -> Behaviour:
    """The Amazon Beauty 5-core benchmark: Beauty.txt plus item attributes and ASINs as titles."""
    root = Path(data_dir) / "amazon_beauty"
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data directory not found (set --data-dir or SEARCHREC_DATA_DIR)")
    if not (root / "Beauty.txt").is_file():
        raise DataError(f"{root}: no Beauty.txt in the data directory")
    titles = {}
    maps = root / "datamaps.json"
    if maps.is_file():
        titles = {k: f"Amazon Beauty {v}" for k, v in json.loads(maps.read_text())["id2item"].items()}
    b = load_seqfile(root / "Beauty.txt", on_error, titles)
    attr_file = root / "Beauty_item2attributes.json"
    if attr_file.is_file():
        raw = json.loads(attr_file.read_text())
        b.attributes = [[int(a) for a in raw.get(i, [])] for i in b.items["item_id"]]
        b.report.counts["items_with_attributes"] = sum(1 for a in b.attributes if a)
    b.source = "amazon_beauty"
    return b


def prepare_online_retail(data_dir: Path) -> Behaviour:
    """Clean the raw UCI Online Retail purchases into a catalog and per-customer purchase sequences."""
    path = Path(data_dir) / "online_retail" / "online_retail.parquet"
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data directory not found (set --data-dir or SEARCHREC_DATA_DIR)")
    if not path.is_file():
        raise DataError(f"{path}: Online Retail parquet not found")
    df = pd.read_parquet(path)
    missing = {"InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}")
    report = Report()
    report.counts["rows_read"] = len(df)
    df = df.reset_index(drop=True)
    df["InvoiceNo"] = df["InvoiceNo"].astype(str)
    df["StockCode"] = df["StockCode"].astype(str).str.strip().str.upper()

    def drop(mask: pd.Series, reason: str) -> None:
        nonlocal df
        n = int(mask.sum())
        if n:
            report.dropped[reason] += n
            report.examples.setdefault(reason, f"{path}: row {int(mask[mask].index[0])}")
            df = df[~mask]

    drop(df["CustomerID"].isna(), "no customer id")
    cancel = df["InvoiceNo"].str.startswith("C")
    cancels = df[cancel]
    df_rest = df[~cancel]
    # A cancellation undoes the latest earlier purchase of the same customer, code and quantity.
    open_buys: dict[tuple, list[int]] = defaultdict(list)
    for idx, c, s, q in zip(df_rest.index, df_rest["CustomerID"], df_rest["StockCode"], df_rest["Quantity"]):
        open_buys[(c, s, q)].append(idx)
    dates = df["InvoiceDate"]
    undone = []
    for idx, c, s, q in zip(cancels.index, cancels["CustomerID"], cancels["StockCode"], cancels["Quantity"]):
        cands = open_buys.get((c, s, -q))
        earlier = [i for i in cands if dates[i] <= dates[idx]] if cands else []
        if earlier:
            undone.append(earlier[-1])
            cands.remove(earlier[-1])
    drop(cancel, "cancellation row")
    drop(pd.Series(df.index.isin(undone), index=df.index), "purchase undone by a cancellation")
    drop(~df["StockCode"].map(lambda s: bool(PRODUCT_CODE.match(s))), "non-product stock code")
    drop(df["Quantity"] <= 0, "quantity <= 0")
    drop(~(df["UnitPrice"] > 0), "unit price <= 0")
    desc = df["Description"].fillna("").astype(str).map(clean_text)
    df = df.assign(Description=desc)
    named = df[df["Description"] != ""]
    best_name = named.groupby("StockCode")["Description"].agg(lambda s: s.value_counts().index[0])
    drop(~df["StockCode"].isin(best_name.index), "stock code never has a description")
    codes = sorted(df["StockCode"].unique())
    row = {c: i for i, c in enumerate(codes)}
    price = df.groupby("StockCode")["UnitPrice"].median()
    items = _catalog_frame(codes, [best_name[c].title() for c in codes], [round(float(price[c]), 2) for c in codes])
    report.counts.update(items=len(codes), purchase_rows=len(df))
    df = df.assign(user=df["CustomerID"].astype(int).astype(str), ts=df["InvoiceDate"].astype("int64") // 10 ** 9)
    # One interaction per (invoice, item): a basket lists an item once however many lines it has.
    df = df.drop_duplicates(["InvoiceNo", "StockCode"]).sort_values(["user", "ts"], kind="stable")
    users, seqs, times = [], [], []
    for user, g in df.groupby("user", sort=True):
        users.append(user)
        seqs.append([row[c] for c in g["StockCode"]])
        times.append(g["ts"].astype(int).tolist())
    report.counts.update(users=len(users), interactions=sum(map(len, seqs)), baskets=int(df["InvoiceNo"].nunique()))
    return Behaviour(items, users, seqs, times, report, source="online_retail")


def load_interactions_csv(path: Path, items: pd.DataFrame, on_error: str = "fail") -> Behaviour:
    """`user_id,item_id,timestamp[,type]` rows over a catalog; unknown items are errors or dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: interactions file not found")
    report = Report()
    row = {i: r for r, i in enumerate(items["item_id"])}
    events: dict[str, list[tuple[int, int]]] = defaultdict(list)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"user_id", "item_id", "timestamp"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DataError(f"{path}: header must have {sorted(need)}, got {reader.fieldnames}")
        for lineno, rec in enumerate(reader, 2):
            where = f"{path}:{lineno}"
            report.counts["rows_read"] += 1
            problem = None
            user, item = (rec.get("user_id") or "").strip(), (rec.get("item_id") or "").strip()
            try:
                ts = int(float(rec.get("timestamp") or ""))
            except ValueError:
                ts, problem = 0, f"timestamp {rec.get('timestamp')!r} is not a number"
            if not user:
                problem = "empty user_id"
            elif item not in row:
                problem = f"item_id {item!r} is not in the catalog"
            if problem:
                if on_error == "fail":
                    raise DataError(f"{where}: {problem} (use --on-error drop to skip such rows)")
                report.drop(problem, where)
                continue
            events[user].append((ts, row[item]))
    users = sorted(events)
    seqs, times = [], []
    for u in users:
        ev = sorted(events[u], key=lambda e: e[0])
        seqs.append([r for _, r in ev])
        times.append([t for t, _ in ev])
    report.counts.update(users=len(users), interactions=sum(map(len, seqs)))
    return Behaviour(items.reset_index(drop=True), users, seqs, times, report, source=str(path))


def add_events(b: Behaviour, events: list[dict]) -> int:
    """Append served feedback (event-log records with user_id, item_id, timestamp_ms) to b; returns
    how many were used (events for items outside b's catalog are counted and skipped)."""
    row = {i: r for r, i in enumerate(b.items["item_id"])}
    index = {u: i for i, u in enumerate(b.users)}
    used = 0
    for e in sorted(events, key=lambda e: e["timestamp_ms"]):
        r = row.get(e["item_id"])
        if r is None:
            b.report.drop("event for an item outside the catalog", e.get("event_id", ""))
            continue
        u = index.get(e["user_id"])
        if u is None:
            index[e["user_id"]] = u = len(b.users)
            b.users.append(e["user_id"])
            b.sequences.append([])
            if b.times is not None:
                b.times.append([])
        b.sequences[u].append(r)
        if b.times is not None:
            b.times[u].append(int(e["timestamp_ms"]) // 1000)
        used += 1
    b.report.counts["served_events_used"] += used
    return used


def repeat_rate(seqs: list[list[int]]) -> float:
    """Share of interactions with an item the user had already interacted with."""
    repeats = total = 0
    for s in seqs:
        seen: set[int] = set()
        for r in s:
            repeats += r in seen
            seen.add(r)
        total += len(s)
    return repeats / max(total, 1)


def leave_one_out(seqs: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """Rows shifted to 1-based. train = all but the last two, valid = second-to-last, test = last
    (users with fewer than 3 items: everything is training, no targets)."""
    train, valid, test = [], [], []
    for s in seqs:
        s1 = [r + 1 for r in s]
        if len(s1) >= 3:
            train.append(s1[:-2]), valid.append(s1[-2]), test.append(s1[-1])
        else:
            train.append(s1), valid.append(0), test.append(0)
    return train, valid, test


def temporal_split(b: Behaviour, cutoff: int) -> tuple[list[list[int]], list[list[int]]]:
    """(before, after) item rows per user: interactions with time < cutoff vs >= cutoff."""
    if b.times is None:
        raise DataError(f"{b.source}: a temporal split needs timestamps")
    before, after = [], []
    for s, t in zip(b.sequences, b.times):
        t_arr = np.asarray(t)
        cut = int(np.searchsorted(t_arr, cutoff, side="left"))
        before.append(s[:cut])
        after.append(s[cut:])
    return before, after


def popularity(seqs: list[list[int]], n_items: int, times: list[list[int]] | None = None,
               half_life_days: float = 30.0) -> np.ndarray:
    """Time-decayed interaction counts per item (plain counts when there are no times)."""
    pop = np.zeros(n_items, np.float64)
    if times is None:
        for s in seqs:
            np.add.at(pop, s, 1.0)
        return pop.astype(np.float32)
    now = max((t[-1] for t in times if t), default=0)
    for s, t in zip(seqs, times):
        w = 0.5 ** ((now - np.asarray(t, np.float64)) / (86400.0 * half_life_days))
        np.add.at(pop, s, w)
    return pop.astype(np.float32)


def co_occurrence(seqs: list[list[int]], n_items: int, window: int = 5, top: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item -> items that users interact with within `window` steps of it, both directions, weighted
    1/distance, normalised by sqrt of both items' counts. CSR (indptr, indices, weights), top per item."""
    pairs: dict[int, Counter] = defaultdict(Counter)
    count = np.zeros(n_items, np.float64)
    for s in seqs:
        for i, a in enumerate(s):
            count[a] += 1
            for d in range(1, window + 1):
                if i + d >= len(s):
                    break
                b_ = s[i + d]
                if b_ != a:
                    pairs[a][b_] += 1.0 / d
                    pairs[b_][a] += 1.0 / d
    indptr = [0]
    indices: list[int] = []
    weights: list[float] = []
    for a in range(n_items):
        best = pairs[a].most_common(top) if a in pairs else []
        best.sort()
        for b_, w in best:
            indices.append(b_)
            weights.append(w / np.sqrt(max(count[a], 1.0) * max(count[b_], 1.0)))
        indptr.append(len(indices))
    return np.asarray(indptr, np.int64), np.asarray(indices, np.int32), np.asarray(weights, np.float32)
