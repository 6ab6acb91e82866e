"""`python -m server --bundle DIR --port N --device auto|cpu|cuda ...` (see --help).

Exit status 2 when the bundle, the device or a TLS/tokens/key file cannot be used. SIGTERM/SIGINT shut down gracefully;
SIGHUP re-reads the bundle directory being served and swaps it in.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from common.encoding import DeviceError
from server.access import AccessConfigError
from server.app import create_server
from server.bundle import BundleError
from server.config import ServerConfig, from_args
from server.errors import FailedPrecondition, Unavailable
from server.store import StoreError

log = logging.getLogger("server")


async def serve(config: ServerConfig) -> None:
    server, port = await create_server(config)
    print(f"searchrec serving {server.holder.current.version} on {config.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def reload() -> None:
        try:
            await server.reload(None)
        except (FailedPrecondition, Unavailable) as exc:
            log.error("SIGHUP reload failed: %s", exc.message)

    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    await stop.wait()
    log.info("shutting down (grace %.1fs)", config.grace_s)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    config = from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.workers > 1:
        from server.workers import run_workers

        return run_workers(config, list(sys.argv[1:] if argv is None else argv))
    # No weight-loading progress bars in the server's log. Set before anything imports huggingface_hub
    # (it reads this once); transformers itself is imported only if the encoder graph has to be traced.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print("searchrec config:\n" + config.describe(), flush=True)
    try:
        asyncio.run(serve(config))
    except (BundleError, DeviceError, AccessConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
