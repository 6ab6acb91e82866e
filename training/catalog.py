"""Read a product catalog (JSONL or CSV with the Item fields) into a clean, validated DataFrame.

Columns out: item_id, title, description, category, brand, price (float, NaN = unknown), in_stock
(bool), attributes (JSON text). A malformed row is an error that names the file, the row and the
problem; nothing is silently dropped.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd

from common.text import has_control_chars, normalize

COLUMNS = ("item_id", "title", "description", "category", "brand", "price", "in_stock", "attributes")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


class CatalogError(ValueError):
    """A catalog file or row that cannot be used; the message names file, row and problem."""


def _clean_text(value, where: str, field: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, (str, int, float)):
        raise CatalogError(f"{where}: field '{field}' must be text, got {type(value).__name__}")
    text = str(value)
    if has_control_chars(text):
        raise CatalogError(f"{where}: field '{field}' contains control characters")
    # Collapse whitespace but keep case: titles are shown to users.
    return " ".join(text.split())


def _parse_price(value, where: str) -> float:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise CatalogError(f"{where}: field 'price' must be a number, got {value!r}") from None
    if not math.isfinite(price) or price < 0:
        raise CatalogError(f"{where}: field 'price' must be a finite number >= 0, got {value!r}")
    return price


def _parse_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text == "":
        return True  # in stock unless the catalog says otherwise
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CatalogError(f"{where}: field 'in_stock' must be true/false, got {value!r}")


def _rows(path: Path):
    """Yield (row_number, dict) from a JSONL or CSV file; row numbers are 1-based file lines."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if suffix in (".jsonl", ".json", ".ndjson"):
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CatalogError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise CatalogError(f"{path}:{n}: expected a JSON object per line")
                    yield n, row
            elif suffix == ".csv":
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "item_id" not in reader.fieldnames:
                    raise CatalogError(f"{path}: CSV header must include item_id and title")
                for n, row in enumerate(reader, start=2):
                    yield n, row
            else:
                raise CatalogError(f"{path}: unknown catalog format {suffix!r} (use .jsonl or .csv)")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc})") from None


def load_catalog(path: str | Path) -> pd.DataFrame:
    """Load and validate a catalog file; raises CatalogError naming file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    records: list[dict] = []
    seen: dict[str, int] = {}
    for n, row in _rows(path):
        where = f"{path}:{n}"
        item_id = _clean_text(row.get("item_id"), where, "item_id")
        if not item_id:
            raise CatalogError(f"{where}: field 'item_id' is empty")
        if item_id in seen:
            raise CatalogError(f"{where}: duplicate item_id {item_id!r} (first at row {seen[item_id]})")
        seen[item_id] = n
        title = _clean_text(row.get("title"), where, "title")
        if not normalize(title):
            raise CatalogError(f"{where}: field 'title' is empty for item {item_id!r}")
        attributes = row.get("attributes") or {}
        if isinstance(attributes, str):
            try:
                attributes = json.loads(attributes)
            except json.JSONDecodeError:
                raise CatalogError(f"{where}: field 'attributes' is not a JSON object") from None
        if not isinstance(attributes, dict):
            raise CatalogError(f"{where}: field 'attributes' must be an object of strings")
        records.append(
            {
                "item_id": item_id,
                "title": title,
                "description": _clean_text(row.get("description"), where, "description"),
                "category": _clean_text(row.get("category"), where, "category"),
                "brand": _clean_text(row.get("brand"), where, "brand"),
                "price": _parse_price(row.get("price"), where),
                "in_stock": _parse_bool(row.get("in_stock"), where),
                "attributes": json.dumps({str(k): str(v) for k, v in attributes.items()}, sort_keys=True),
            }
        )
    if not records:
        raise CatalogError(f"{path}: the catalog has no items")
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))
