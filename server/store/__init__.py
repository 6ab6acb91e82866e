"""The engine's shared state behind one interface (`StateStore`), with two implementations:

- `LocalStore` (the default, `--state-dir DIR`): the fsync'd event log of one process, as before;
- `RedisStore` (`--state redis://host:port/db`): Redis streams for the ordered event, catalog-change and
  control logs, per-user lists with TTLs, hashes for the catalog snapshot and live counters, shared by
  every replica of a fleet.

Nothing above this package knows which one runs; `make_store` picks it from the config.
"""
from __future__ import annotations

from server.store.base import StateStore, StoreError, StoreUnavailable, parse_token
from server.store.local import LocalStore

__all__ = ["StateStore", "StoreError", "StoreUnavailable", "LocalStore", "make_store", "parse_token"]


def make_store(config, live) -> StateStore | None:
    """The store a config asks for (None: no durable state, write RPCs are refused)."""
    if config.state:
        from server.store.redisstore import RedisStore  # imports the redis client only when asked for

        return RedisStore(config, live)
    if config.state_dir:
        return LocalStore(live)
    return None
