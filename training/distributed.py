"""Data-parallel training on torch.distributed: launch checks, rank roles and the few collectives we use.

A build runs data-parallel when it is started by `torchrun` (one machine: `torchrun --nproc-per-node 2 -m
training build ...`; several: `--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`), or by `python -m
training build --nproc-per-node 2`, which re-executes the same command under torchrun. torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process; `from_env` checks them and joins the
process group (gloo on CPU, NCCL on GPU). Without them the build is the usual single process.

Roles: every rank trains (DistributedDataParallel keeps the weights identical after each step) and encodes
its shard of the catalog; rank 0 alone writes checkpoints, TensorBoard events and the bundle. Decisions that
must not diverge (early stopping, the time budget) are taken on rank 0 and broadcast (`agree`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# How long a rank waits for the others at the rendezvous and in any collective (a rank that cannot reach the
# others fails with a clear error after this, instead of hanging). SEARCHREC_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 300.0
# How long the other ranks wait while rank 0 alone runs a step (preparing the data, training the reranker): a
# separate gloo group with this timeout carries those waits. SEARCHREC_DIST_WAIT_S overrides it.
DEFAULT_WAIT_S = 6 * 3600.0


class LaunchError(ValueError):
    """The launch environment is inconsistent, or the ranks could not reach each other."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not launched distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": self.backend or "none"}


SINGLE = Dist()
_current: Dist = SINGLE
_patient: Any = None  # the long-timeout group for waiting on rank 0 (None: not distributed)


def current() -> Dist:
    """The process group this process joined (SINGLE when none)."""
    return _current


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None


def check_env() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) from the launcher's variables, None when not launched distributed; a
    LaunchError naming the variable when they do not fit together."""
    rank, world, local = _int_env("RANK"), _int_env("WORLD_SIZE"), _int_env("LOCAL_RANK")
    if rank is None and world is None:
        return None
    if world is None:
        raise LaunchError(f"RANK={rank} is set but WORLD_SIZE is not; launch with torchrun (it sets both)")
    if rank is None:
        raise LaunchError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun (it sets both)")
    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world}: must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise LaunchError(f"WORLD_SIZE={world} without a rendezvous: {' and '.join(missing)} not set "
                              f"(torchrun sets them; with several machines give --rdzv-endpoint HOST:PORT)")
        port = _int_env("MASTER_PORT")
        if not 0 < port < 65536:
            raise LaunchError(f"MASTER_PORT={port}: not a TCP port")
    return rank, world, local if local is not None else rank


def from_env(device: str = "cpu") -> Dist:
    """Join the process group the launcher describes (idempotent); SINGLE when not launched distributed."""
    global _current, _patient
    if _current.enabled:
        return _current
    env = check_env()
    if env is None or env[1] == 1:
        return SINGLE
    rank, world, local = env
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = float(os.environ.get("SEARCHREC_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        # One collective at once: a rank that reached the store but not its peers fails here, not mid-epoch.
        dist.barrier()
        wait = float(os.environ.get("SEARCHREC_DIST_WAIT_S", DEFAULT_WAIT_S))
        _patient = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    except Exception as exc:  # DistStoreError, RuntimeError, TimeoutError: all mean the same to the user
        raise LaunchError(f"rank {rank} of {world} could not reach the other ranks at {where} within {timeout:.0f} s "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    _current = Dist(rank, world, local, backend)
    if rank != 0:  # one voice in the output: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    log.info("joined the process group: rank %d of %d (%s, rendezvous %s)", rank, world, backend, where)
    return _current


def shutdown() -> None:
    global _current, _patient
    _patient = None
    if _current.enabled and dist.is_initialized():
        import gc

        gc.collect()  # no gloo work object may outlive the group (a live one aborts the process at exit)
        dist.destroy_process_group()
    _current = SINGLE


def agree(value: Any, d: Dist | None = None, patient: bool = False) -> Any:
    """Rank 0's value on every rank (a decision all ranks must take together). patient: the other ranks may
    wait here while rank 0 works alone (up to SEARCHREC_DIST_WAIT_S instead of the usual timeout)."""
    d = d or _current
    if not d.enabled:
        return value
    box = [value if d.main else None]
    dist.broadcast_object_list(box, src=0, group=_patient if patient else None)
    return box[0]


def gather_objects(value: Any, d: Dist | None = None) -> list[Any]:
    """Every rank's value, in rank order."""
    d = d or _current
    if not d.enabled:
        return [value]
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, value)
    return parts


def share_files(src: Path, dst: Path, rels: list[str], d: Dist | None = None) -> int:
    """Rank 0's files or folders `rels` under src, written under dst on the other ranks (which may run on other
    machines, with no shared disk): how the outputs of a step that rank 0 ran alone reach them. Returns the
    bytes shared; the other ranks may wait here while rank 0 finishes its step."""
    d = d or _current
    if not d.enabled:
        return 0
    payload: dict[str, bytes] | None = None
    if d.main:
        payload = {}
        for rel in rels:
            root = src / rel
            for f in [root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file()):
                payload[str(f.relative_to(src))] = f.read_bytes()
    payload = agree(payload, d, patient=True)
    if not d.main:
        for rel, data in payload.items():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(data)
    return sum(len(v) for v in payload.values())


def gather_with_grad(t: torch.Tensor, d: Dist | None = None) -> torch.Tensor:
    """Every rank's rows of t concatenated in rank order (same shape on every rank), this rank's block keeping its
    autograd graph and the others' detached. A loss over the whole gathered batch, computed the same on every
    rank and multiplied by the world size, then gives (after DistributedDataParallel's average) the gradient of
    that loss in one process: each rank back-propagates through its own rows only."""
    d = d or _current
    if not d.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[d.rank] = t
    return torch.cat(parts)


def all_sum(values: list[float], d: Dist | None = None) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    d = d or _current
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shard_range(n: int, d: Dist | None = None) -> range:
    """This rank's contiguous part of n rows (parts differ in size by at most one row)."""
    d = d or _current
    return range(n * d.rank // d.world, n * (d.rank + 1) // d.world)


def gather_rows(part: np.ndarray, d: Dist | None = None) -> np.ndarray:
    """Every rank's rows, concatenated in rank order (the inverse of shard_range)."""
    d = d or _current
    return np.concatenate(gather_objects(part, d), axis=0) if d.enabled else part


def barrier(d: Dist | None = None) -> None:
    d = d or _current
    if d.enabled:
        dist.barrier()
