"""Training checkpoints shared by the recommender, encoder fine-tuning and the classifier.

Rank 0 writes a checkpoint atomically and reads it back on resume; the other ranks receive what they need over
the process group, so ranks on other machines need no shared disk. A checkpoint carries the fingerprint of
the data and settings it was trained with, and one of other data or settings is not resumed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from training import distributed as D

log = logging.getLogger(__name__)


def save(path: Path, state: dict) -> None:
    """Write state to path (rank 0 calls this): a kill mid-write leaves the previous checkpoint, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path | None, fingerprint: str, local: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at path if it was written with `fingerprint`, else None (none, unreadable, or of other data or
    settings); the same answer on every rank. Rank 0 reads it and gets all of it; the other ranks get it without
    the `local` keys (what only rank 0 needs, such as weights that DistributedDataParallel copies from rank 0)."""
    d = D.current()
    state = None
    if d.main and path is not None and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a file from an older torch or a broken disk: start over, say so
            log.warning("checkpoint %s unreadable (%s); starting from the beginning", path, exc)
        if state is not None and state.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s is of other data or settings; starting from the beginning", path)
            state = None
    if not d.enabled:
        return state
    shared = D.agree(None if state is None else {k: v for k, v in state.items() if k not in local}, patient=True)
    return state if d.main else shared
