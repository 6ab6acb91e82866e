"""The server's one frozen configuration, built from command-line flags with environment defaults.

Every environment variable the server reads is read here, in `from_args`, never at import time.
Each flag `--some-flag` can also be set as `SEARCHREC_SOME_FLAG`; the flag wins.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from common.cpu import available_cores
from common.encoding import BACKENDS, DTYPES

MAX_QUERY_CHARS = 1000
MAX_K = 1000
DEFAULT_K = 10


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know; printed at start."""

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (cuda only) | int8 (cpu only)
    backend: str = "auto"  # auto | torch | onnx: the encoder's inference engine (auto: onnx on CPU)
    max_batch_size: int = 32
    max_delay_ms: float = 2.0  # only with batch_idle_wait: a free compute slot otherwise takes the queue at once
    batch_idle_wait: bool = False  # the old rule: a batch waits max_delay_ms for company even when a slot is free
    max_queue: int = 64  # per batcher; deeper queues only add waiting (deadline-aware admission refuses early anyway)
    candidates: int = 100  # dense and lexical candidates per query before reranking
    exact_filter_max: int = 4096  # filtered subsets this small are searched exactly
    # Compute threads: batches (and SimilarItems) run on this many threads at once. 0 = auto: 2 where the
    # process has >= 2 cores. On this 2-core CPU two batches at once ran 2.1x the queries of one at batch 1
    # and 4, 1.7x at 8 (single-threaded stages -- tokenizing, BM25, trees -- left a core idle).
    compute_workers: int = 0
    torch_threads: int = 0  # 0 = auto: the process's cores divided among the compute threads
    grace_s: float = 5.0
    warmup: bool = True
    encoder_trace: bool = True  # TorchScript-trace the encoder on CPU fp32 and int8 (less per-call overhead)
    # Traced encoder graphs are kept here, keyed by the weights' sha256, torch version and precision: a
    # restart or hot swap to the same encoder loads its graph (~0.3 s) instead of tracing it (~5-7 s).
    # None = trace at every load. The command line defaults it to ~/.cache/searchrec.
    encoder_cache: Path | None = None
    log_level: str = "INFO"
    max_message_bytes: int = 4 * 1024 * 1024
    state_dir: Path | None = None  # event log + live catalog changes; None = write RPCs are refused
    max_user_events: int = 50  # live events kept per user (the sequence model reads at most this many)
    rec_candidates: int = 200  # recommender candidates per request before re-scoring
    max_write_batch: int = 1000  # events / items / ids per write request
    fsync: bool = True  # fsync the event log before acknowledging (off only for throwaway tests)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = a free one); None = off
    # Calls in flight at once; beyond it gRPC answers RESOURCE_EXHAUSTED cheaply, in its C core, before any
    # Python runs. 64 (= max_queue, two full batches) measured best under a 10x flood here (docs/reliability.json).
    max_concurrent_rpcs: int = 64
    admit_fraction: float = 1.0  # a queued call needs its predicted wait <= this share of its remaining deadline
    max_live_users: int = 1_000_000  # users with live state in memory (least recently active evicted first)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: serve TLS instead of plaintext
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: require client certificates signed by it (mutual TLS)
    tokens: Path | None = None  # JSON file of callers, their tokens and roles; None = no token check
    page_token_key: Path | None = None  # file of a secret that signs page tokens (default: one kept with the state)
    user_id_key: Path | None = None  # secret key file: user ids are stored and logged as keyed hashes
    # Shared state (a fleet): redis://host:port/db or rediss:// (TLS). None = the local log under state_dir.
    state: str | None = None
    state_prefix: str = "searchrec"  # key namespace in the store (several fleets can share one Redis)
    state_username: str = ""  # Redis ACL user
    state_password: str = dataclasses.field(default="", repr=False)  # from a file or env; never printed
    state_tls_ca: Path | None = None  # PEM CA that signed the store's TLS certificate (rediss://)
    replica_id: str = ""  # this replica's name in the fleet ("" = hostname-pid)
    user_state_ttl_s: int = 30 * 86400  # a user's live state in the store expires this long after their last event
    event_id_ttl_s: int = 7 * 86400  # Feedback is idempotent by event id for this long
    rollout_timeout_s: float = 600.0  # a fleet rollout waits this long for every replica to load the bundle
    # HTTP/2 connections are closed (GOAWAY, then a grace period) after this age, so that clients behind L4
    # balancers reconnect and spread over new replicas. 0 = never.
    max_connection_age_s: float = 300.0
    # Sponsored products (docs/ads.md).
    ads_slots: int = 2  # sponsored slots per answer when campaigns target it (a request's ad_slots overrides; 0 = off)
    ads_reserve_cpc: float = 0.05  # the least a click costs; bids below it never serve
    ads_floor_rank: int = 10  # an ad must score at least what the organic item at this rank scores
    ads_auction: str = "gsp"  # gsp | first_price | relevance (the last two for comparisons)
    ads_pacing: bool = True  # throttle campaigns whose spend runs ahead of the day
    ads_pacing_lookahead: float = 1 / 24  # share of the daily budget a campaign may spend ahead of the clock
    ads_day_s: float = 86400.0  # length of a budget day (shorter only for simulations)
    ads_day_start_ms: int = 0  # when budget day 0 began (0: UTC days; simulations start their day at a set time)
    workers: int = 1  # replica processes on this machine (`--workers N`: N processes on ports port..port+N-1)
    # UpsertItems writes the classifier's category into an item that has none when its probability reaches the
    # threshold (marked predicted; a merchant's category is never changed). Needs a bundle with a classifier.
    autofill_categories: bool = True
    autofill_threshold: float | None = None  # None = the bundle's (fitted on its dev split); 1 = never fill

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append("max_batch_size must be >= 1")
        if self.max_delay_ms < 0:
            problems.append("max_delay_ms must be >= 0")
        if self.max_queue < 1:
            problems.append("max_queue must be >= 1")
        if not 0 <= self.port <= 65535:
            problems.append("port must be in 0..65535")
        if self.candidates < 1:
            problems.append("candidates must be >= 1")
        if self.max_user_events < 1:
            problems.append("max_user_events must be >= 1")
        if self.rec_candidates < 1:
            problems.append("rec_candidates must be >= 1")
        if self.max_write_batch < 1:
            problems.append("max_write_batch must be >= 1")
        if self.compute_workers < 0:
            problems.append("compute_workers must be >= 0 (0 = auto)")
        if self.torch_threads < 0:
            problems.append("torch_threads must be >= 0 (0 = auto)")
        if self.max_concurrent_rpcs < 1:
            problems.append("max_concurrent_rpcs must be >= 1")
        if self.state and not self.state.startswith(("redis://", "rediss://", "unix://")):
            problems.append(f"state must be a redis://, rediss:// or unix:// URL, got {self.state!r}")
        if self.state and self.state_dir:
            problems.append("state and state_dir are two different stores: give one")
        if self.workers < 1:
            problems.append("workers must be >= 1")
        if self.max_connection_age_s < 0:
            problems.append("max_connection_age_s must be >= 0 (0 = never)")
        if not 0 < self.admit_fraction <= 1:
            problems.append("admit_fraction must be in (0, 1]")
        if self.autofill_threshold is not None and not 0 < self.autofill_threshold <= 1:
            problems.append(f"autofill_threshold must be in (0, 1], got {self.autofill_threshold}")
        if self.max_live_users < 1:
            problems.append("max_live_users must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if not 0 <= self.ads_slots <= 5:
            problems.append(f"ads_slots must be in 0..5, got {self.ads_slots}")
        if not (self.ads_reserve_cpc >= 0.01 and self.ads_reserve_cpc < 1e6):
            problems.append(f"ads_reserve_cpc must be at least 0.01 (a cent), got {self.ads_reserve_cpc}")
        if self.ads_floor_rank < 1:
            problems.append("ads_floor_rank must be >= 1")
        if self.ads_auction not in ("gsp", "first_price", "relevance"):
            problems.append(f"ads_auction must be gsp, first_price or relevance, got {self.ads_auction!r}")
        if not 0 <= self.ads_pacing_lookahead <= 1:
            problems.append("ads_pacing_lookahead must be in 0..1 (a share of the day)")
        if not self.ads_day_s >= 1:
            problems.append("ads_day_s must be >= 1")
        if self.ads_day_start_ms < 0:
            problems.append("ads_day_start_ms must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def _shown(self, name: str):
        """A field's value as logs may show it: no store password, none inside the store URL either."""
        from server.store.redisstore import redact

        value = getattr(self, name)
        if name == "state_password":
            return "***" if value else ""
        return redact(value) if name == "state" and value else value

    def describe(self) -> str:
        return "\n".join(f"  {f.name} = {self._shown(f.name)}" for f in dataclasses.fields(self))

    def __repr__(self) -> str:  # dataclass keeps a __repr__ defined here
        return f"ServerConfig({', '.join(f'{f.name}={self._shown(f.name)!r}' for f in dataclasses.fields(self))})"


def compute_plan(config: ServerConfig, cores: int | None = None) -> tuple[int, int]:
    """(compute threads, torch threads) for a config: explicit values win; auto splits the cores."""
    cores = cores or available_cores()
    workers = config.compute_workers or (2 if cores >= 2 else 1)
    threads = config.torch_threads or max(1, cores // workers)
    return workers, threads


def default_cache_dir() -> str:
    """Where the command line keeps the encoder graph cache: $XDG_CACHE_HOME/searchrec or ~/.cache/searchrec."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "searchrec")


def _optional_path(value: str | None) -> Path | None:
    return None if value in (None, "", "none") else Path(value)


def _env(name: str, default):
    return os.environ.get("SEARCHREC_" + name.upper(), default)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig(bundle=Path("."))
    p = argparse.ArgumentParser(prog="python -m server", description="Serve a searchrec bundle over gRPC.")
    p.add_argument("--bundle", type=Path, default=_env("bundle", None), help="bundle directory")
    p.add_argument("--host", default=_env("host", d.host))
    p.add_argument("--port", type=int, default=int(_env("port", d.port)), help="0 = pick a free port")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_env("device", d.device))
    p.add_argument("--dtype", choices=DTYPES, default=_env("dtype", d.dtype),
                   help="encoder precision: auto (float16 on CUDA; int8 with the onnx backend; with torch on CPU bfloat16 "
                        "where bf16 is native, else float32), float32, bfloat16 (torch only) or int8 (CPU)")
    p.add_argument("--backend", choices=BACKENDS, default=_env("backend", d.backend),
                   help="the encoder's inference engine: auto (ONNX Runtime on CPU, int8 unless --dtype says "
                        "float32; torch on CUDA or for --dtype bfloat16), torch (eager/TorchScript) or onnx")
    p.add_argument("--max-batch-size", type=int, default=int(_env("max_batch_size", d.max_batch_size)))
    p.add_argument("--max-delay-ms", type=float, default=float(_env("max_delay_ms", d.max_delay_ms)),
                   help="with --batch-idle-wait: how long a batch waits for company after its first request")
    p.add_argument("--batch-idle-wait", action="store_true", default=_env("batch_idle_wait", "") in ("1", "true"),
                   help="wait --max-delay-ms for company even when a compute slot is free (the old rule; by "
                        "default a free slot takes what is queued at once, and batches fill while slots are busy)")
    p.add_argument("--max-queue", type=int, default=int(_env("max_queue", d.max_queue)))
    p.add_argument("--candidates", type=int, default=int(_env("candidates", d.candidates)))
    p.add_argument("--exact-filter-max", type=int, default=int(_env("exact_filter_max", d.exact_filter_max)))
    p.add_argument("--compute-workers", type=int, default=int(_env("compute_workers", d.compute_workers)),
                   help="batches computed at once, one thread each (0 = auto: 2 on a machine with >= 2 cores)")
    p.add_argument("--torch-threads", type=int, default=int(_env("torch_threads", d.torch_threads)),
                   help="torch (and FAISS) threads per process (0 = auto: cores / compute workers)")
    p.add_argument("--grace-s", type=float, default=float(_env("grace_s", d.grace_s)))
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=True)
    p.add_argument("--no-encoder-trace", dest="encoder_trace", action="store_false", default=True,
                   help="run the encoder eagerly instead of TorchScript-traced (only CPU fp32 and int8 trace)")
    p.add_argument("--encoder-cache", type=_optional_path, default=_env("encoder_cache", default_cache_dir()),
                   help="folder for traced encoder graphs, reused by later starts ('none' = trace at every start)")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument("--state-dir", type=Path, default=_env("state_dir", None),
                   help="durable event log and live catalog changes (required for Feedback/UpsertItems/DeleteItems)")
    p.add_argument("--max-user-events", type=int, default=int(_env("max_user_events", d.max_user_events)))
    p.add_argument("--rec-candidates", type=int, default=int(_env("rec_candidates", d.rec_candidates)))
    p.add_argument("--metrics-port", type=int, default=_env("metrics_port", None),
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = a free port; default off)")
    p.add_argument("--max-write-batch", type=int, default=int(_env("max_write_batch", d.max_write_batch)))
    p.add_argument("--max-concurrent-rpcs", type=int, default=int(_env("max_concurrent_rpcs", d.max_concurrent_rpcs)))
    p.add_argument("--admit-fraction", type=float, default=float(_env("admit_fraction", d.admit_fraction)),
                   help="admit a queued call only if its predicted wait fits in this share of its remaining deadline")
    p.add_argument("--max-live-users", type=int, default=int(_env("max_live_users", d.max_live_users)))
    p.add_argument("--max-message-bytes", type=int, default=int(_env("max_message_bytes", d.max_message_bytes)))
    p.add_argument("--tls-cert", type=Path, default=_env("tls_cert", None), help="PEM certificate chain (TLS)")
    p.add_argument("--tls-key", type=Path, default=_env("tls_key", None), help="PEM private key (TLS)")
    p.add_argument("--tls-client-ca", type=Path, default=_env("tls_client_ca", None),
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--tokens", type=Path, default=_env("tokens", None),
                   help="JSON file of callers with token (or token_sha256) and roles read/write/reload")
    p.add_argument("--page-token-key", type=Path, default=_env("page_token_key", None),
                   help="file holding a secret that signs Search page tokens (default: one kept in the state dir or "
                        "the shared store, so every replica and a restart accept the same tokens)")
    p.add_argument("--user-id-key", type=Path, default=_env("user_id_key", None),
                   help="file holding a secret key: user ids are pseudonymised (HMAC-SHA256) before logs and the event store")
    p.add_argument("--state", default=_env("state", None),
                   help="shared state for a fleet: redis://HOST:PORT/DB or rediss:// (TLS); default: the local log "
                        "under --state-dir")
    p.add_argument("--state-prefix", default=_env("state_prefix", d.state_prefix))
    p.add_argument("--state-username", default=_env("state_username", d.state_username), help="Redis ACL user")
    p.add_argument("--state-password-file", type=Path, default=_env("state_password_file", None),
                   help="file holding the store password (or set SEARCHREC_STATE_PASSWORD); never logged")
    p.add_argument("--state-tls-ca", type=Path, default=_env("state_tls_ca", None),
                   help="PEM CA of the store's TLS certificate (rediss://)")
    p.add_argument("--replica-id", default=_env("replica_id", d.replica_id))
    p.add_argument("--user-state-ttl-s", type=int, default=int(_env("user_state_ttl_s", d.user_state_ttl_s)))
    p.add_argument("--event-id-ttl-s", type=int, default=int(_env("event_id_ttl_s", d.event_id_ttl_s)))
    p.add_argument("--rollout-timeout-s", type=float, default=float(_env("rollout_timeout_s", d.rollout_timeout_s)))
    p.add_argument("--max-connection-age-s", type=float,
                   default=float(_env("max_connection_age_s", d.max_connection_age_s)),
                   help="close client connections after this age so that they rebalance (0 = never)")
    p.add_argument("--ads-slots", type=int, default=int(_env("ads_slots", d.ads_slots)),
                   help="sponsored slots per Search/Recommend/SimilarItems answer (0 = no ads; a request's ad_slots wins)")
    p.add_argument("--ads-reserve-cpc", type=float, default=float(_env("ads_reserve_cpc", d.ads_reserve_cpc)),
                   help="reserve price: the least a click costs")
    p.add_argument("--ads-floor-rank", type=int, default=int(_env("ads_floor_rank", d.ads_floor_rank)),
                   help="an ad must be as relevant as the organic result at this rank")
    p.add_argument("--ads-auction", choices=("gsp", "first_price", "relevance"), default=_env("ads_auction", d.ads_auction))
    p.add_argument("--no-ads-pacing", dest="ads_pacing", action="store_false",
                   default=_env("ads_pacing", "1").lower() not in ("0", "false", "no", "off"),
                   help="let campaigns spend their daily budget as fast as traffic allows")
    p.add_argument("--ads-pacing-lookahead", type=float,
                   default=float(_env("ads_pacing_lookahead", d.ads_pacing_lookahead)),
                   help="share of the day a campaign may spend ahead of an even pace (default one hour)")
    p.add_argument("--ads-day-s", type=float, default=float(_env("ads_day_s", d.ads_day_s)),
                   help="seconds in a budget day (86400; shorter for simulations: days are then named day-N)")
    p.add_argument("--ads-day-start-ms", type=int, default=int(_env("ads_day_start_ms", d.ads_day_start_ms)),
                   help="simulations: the epoch millisecond at which budget day 0 starts (default 0: UTC days)")
    p.add_argument("--workers", type=int, default=int(_env("workers", d.workers)),
                   help="replica processes on this machine, on ports PORT..PORT+N-1 (needs --state redis://)")
    p.add_argument("--no-autofill-categories", dest="autofill_categories", action="store_false",
                   default=_env("autofill_categories", "1").lower() not in ("0", "false", "no", "off"),
                   help="UpsertItems never fills in a missing category from the bundle's classifier")
    p.add_argument("--autofill-threshold", type=float, default=_env("autofill_threshold", None),
                   help="fill a missing category when the classifier's probability is at least this "
                        "(default: the bundle's threshold, fitted for 95%% precision on its dev split)")
    return p


def _password(args) -> str:
    """The store password: --state-password-file, else SEARCHREC_STATE_PASSWORD (never a flag: flags show in ps)."""
    path = args.__dict__.pop("state_password_file", None)
    if path is not None:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"state_password_file {path}: {exc.strerror}") from exc
    return os.environ.get("SEARCHREC_STATE_PASSWORD", "")


def from_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse flags (and SEARCHREC_* environment defaults) into a ServerConfig."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bundle is None:
        parser.error("--bundle is required (or set SEARCHREC_BUNDLE)")
    try:
        password = _password(args)
        return ServerConfig(**{k: v for k, v in vars(args).items()}, state_password=password)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
