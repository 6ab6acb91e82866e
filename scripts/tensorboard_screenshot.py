"""A PNG screenshot of TensorBoard's scalars for a runs folder (for the docs).

Starts TensorBoard on a free loopback port, drives Debian's headless Chromium with Playwright (pip install
playwright; apt-get install -y chromium; no browser download), waits for the charts to draw, saves the page.

    python scripts/tensorboard_screenshot.py RUNS_DIR OUT.png [--filter REGEX]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from playwright.sync_api import sync_playwright


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("out")
    ap.add_argument("--filter", default="", help="tag filter (regex) typed into TensorBoard's search box")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1150)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.runs, "--host", "127.0.0.1",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=1)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path="/usr/bin/chromium", headless=True,
                viewport={"width": args.width, "height": args.height},
                args=["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--use-angle=swiftshader",
                      "--enable-unsafe-swiftshader"])
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/#timeseries", wait_until="networkidle")
            page.wait_for_timeout(3000)
            close = page.locator("button[aria-label='Close side pane']")
            if close.count():
                close.first.click()
            if args.filter:
                page.fill("input[placeholder*='Filter tags']", args.filter)
                page.keyboard.press("Escape")  # close the tag suggestions over the charts
                page.mouse.click(5, args.height - 5)
            page.wait_for_timeout(8000)
            page.screenshot(path=args.out)
            ctx.close()
    finally:
        tb.terminate()
        tb.wait(10)
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
