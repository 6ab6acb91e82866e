"""Experiment tracking in TensorBoard event files, and `python -m training compare RUN_A RUN_B`.

Each build or update writes one run folder under `--runs` (default `runs/`): losses, learning rate and
validation metrics per step/epoch, evaluation tables and the bundle's manifest as text. Nothing needs an
account or a network: `tensorboard --logdir runs` shows them, and `compare` reads the event files directly.
Only rank 0 of a distributed build writes (the others get a Tracker that does nothing).
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_RUNS = Path("runs")


class Tracker:
    """A TensorBoard writer for one run; every method is a no-op when disabled (other ranks, --no-track)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self._w = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._w = SummaryWriter(log_dir=str(run_dir))

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._w is not None:
            self._w.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.scalar(f"{prefix}/{k}", v, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, step)

    def table(self, tag: str, rows: dict[str, dict[str, float]], step: int = 0) -> None:
        """A metrics table (system -> metric -> value) as a markdown table."""
        cols = sorted({c for r in rows.values() if isinstance(r, dict) for c in r
                       if isinstance(r[c], (int, float))})
        lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name, r in rows.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        self.text(tag, "\n".join(lines), step)

    def manifest(self, manifest: dict[str, Any]) -> None:
        """The bundle's manifest as text (its file list left out: checksums say nothing to a reader)."""
        slim = {k: v for k, v in manifest.items() if k != "files"}
        self.text("manifest", "```\n" + json.dumps(slim, indent=2, default=str) + "\n```")

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


NULL = Tracker(None)


def run_dir_for(runs: Path | None, name: str) -> Path | None:
    """runs/<name>-<UTC time>; None when tracking is off."""
    if runs is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(runs) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


# --- reading runs back -------------------------------------------------------------------------------------

def resolve_run(arg: str, runs: Path = DEFAULT_RUNS) -> Path:
    """A run folder from a path, or from a name (or unique prefix) under runs/."""
    p = Path(arg)
    if p.is_dir():
        return p
    named = "/" not in arg and not p.is_absolute() and Path(runs).is_dir()
    matches = sorted(d for d in Path(runs).iterdir() if d.is_dir() and d.name.startswith(arg)) if named else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"{arg}: no such run folder (nor a run named so under {runs}/)")
    raise ValueError(f"{arg}: {len(matches)} runs under {runs}/ start so: {', '.join(m.name for m in matches[:5])}")


def read_run(run: Path) -> dict[str, Any]:
    """{'scalars': tag -> [(step, value)], 'texts': tag -> last text} of one run folder's event files."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)

    if not any(Path(run).glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{run}: no TensorBoard event files in this folder")
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags.get("scalars", [])}
    texts = {}
    for t in tags.get("tensors", []):
        events = acc.Tensors(t)
        if events and events[-1].tensor_proto.string_val:
            texts[t.removesuffix("/text_summary")] = events[-1].tensor_proto.string_val[0].decode("utf-8")
    return {"scalars": scalars, "texts": texts}


def _manifest_of(run: dict[str, Any]) -> dict[str, Any]:
    text = run["texts"].get("manifest", "")
    text = text.strip().removeprefix("```").removesuffix("```")
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif not isinstance(d, list):
        out[prefix] = d
    return out


# Manifest entries that describe how a build was made (compared as settings); the rest are results.
SETTING_KEYS = ("name", "bundle_version", "code_version", "parent_version", "training.", "recommender.config.",
                "recommender.effective_batch_size", "recommender.learning_rate", "recommender.world_size",
                "finetune.", "update.", "encoder.catalog_encoding.")
RESULT_KEYS = ("recommender.valid_ndcg", "recommender.training.best_epoch", "recommender.training.stop",
               "recommender.training.seconds", "recommender.training.epochs_run", "metrics.", "timings.",
               "update.seconds")


def compare(run_a: Path, run_b: Path) -> str:
    """Two runs side by side: settings, final and best scalars, and the numeric results of their manifests."""
    a, b = read_run(run_a), read_run(run_b)
    lines = [f"A: {run_a}", f"B: {run_b}", ""]
    ma, mb = _flatten(_manifest_of(a)), _flatten(_manifest_of(b))

    def section(title: str, rows: list[tuple[str, str, str]]) -> None:
        if not rows:
            return
        w = max(len(r[0]) for r in rows)
        wa = max(max(len(r[1]) for r in rows), 1)
        lines.append(title)
        for k, va, vb in rows:
            mark = "" if va == vb else "  *"
            lines.append(f"  {k:<{w}}  {va:>{wa}}  {vb}{mark}")
        lines.append("")

    settings = [(k, _fmt(ma.get(k)), _fmt(mb.get(k))) for k in sorted(set(ma) | set(mb))
                if k.startswith(SETTING_KEYS) and not k.startswith(RESULT_KEYS)]
    section("settings (* = differs)", settings)
    rows = []
    for tag in sorted(set(a["scalars"]) | set(b["scalars"])):
        sa, sb = a["scalars"].get(tag, []), b["scalars"].get(tag, [])
        best = max if re.search(r"ndcg|recall|accuracy|hit|f1|mrr", tag, re.I) else min
        for label, pick in (("last", lambda s: s[-1][1] if s else None), ("best", lambda s: best(v for _, v in s) if s else None)):
            if label == "best" and re.search(r"learning_rate|samples_per_s", tag):
                continue
            rows.append((f"{tag} ({label})", _fmt(pick(sa)), _fmt(pick(sb))))
        rows.append((f"{tag} (points)", str(len(sa)), str(len(sb))))
    section("scalars", rows)
    results = [(k, _fmt(ma.get(k)), _fmt(mb.get(k))) for k in sorted(set(ma) | set(mb))
               if k.startswith(RESULT_KEYS) and isinstance(ma.get(k, mb.get(k)), (int, float, str))]
    section("results", results)
    return "\n".join(lines).rstrip() + "\n"
