"""The reliability report: hot swaps under load, kill -9 during writes, hostile input, overload.

    python bench/reliability.py [--bundle DIR] [--quick] --json OUT

Every part runs a real `python -m server` process on loopback (default bundle: bundles/sample, built
first when missing, since the write and Recommend paths need a recommender and a state directory).
Under 10 minutes here (about 4 with --quick). Headline keys: swap_requests, swap_failed,
events_acked, events_lost, hostile_inputs, server_crashes, overload_rss_mb, overload_admitted_p99_ms;
everything measured is under "details". This reports numbers; the assertions live in tests/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchutil import ROOT, table, write_json

from loadtest import hostile, scenarios
from server.stubs import pb
from training.served import ServedBundle


def sample_bundle() -> Path:
    path = ROOT / "bundles" / "sample"
    if not (path / "manifest.json").is_file():
        print("building bundles/sample ...", flush=True)
        subprocess.run([sys.executable, "-m", "training", "build", "--catalog", "training/sample/catalog.jsonl",
                        "--interactions", "training/sample/interactions.csv", "--out", str(path), "--name", "sample"],
                       cwd=ROOT, check=True)
    return path


class KindCounter(hostile.RandomDraw):
    """RandomDraw that notes which hostile kinds each request carried."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.kinds: set[str] = set()

    def text(self) -> str:
        t = super().text()
        if t.strip() == "":
            self.kinds.add("empty values")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in t):
            self.kinds.add("control characters")
        if len(t) > 1000:
            self.kinds.add("long strings")
        return t

    def number(self) -> float:
        x = super().number()
        self.kinds.add("NaN/infinity" if math.isnan(x) or math.isinf(x) else "extreme numbers")
        return x

    def int32(self) -> int:
        x = super().int32()
        if x < 0 or x > 1000:
            self.kinds.add("extreme numbers")
        return x

    def int64(self) -> int:
        x = super().int64()
        if x < 0 or x > 4_000_000_000_000:
            self.kinds.add("extreme numbers")
        return x

    def enum(self) -> int:
        x = super().enum()
        if x not in (1, 2, 3, 4):
            self.kinds.add("unknown enum values")
        return x

    def size(self) -> int:
        n = super().size()
        if n > 200:
            self.kinds.add("huge repeated fields")
        if n > 3:
            self.kinds.add("duplicates")
        if n == 0:
            self.kinds.add("empty values")
        return n


def run_hostile(bundle: Path, work: Path, per_rpc: int) -> dict:
    by_kind: Counter = Counter()
    by_code: Counter = Counter()
    problems: list[str] = []
    crashes = 0
    sent = 0
    with ServedBundle(bundle, device="cpu", extra_args=("--state-dir", str(work / "hostile-state"), "--max-live-users",
                                                       "1000")) as served:
        for rpc, build in hostile.BUILDERS.items():
            n = 3 if rpc == "GetInfo" else per_rpc // 4 if rpc in ("UpsertItems", "ReloadBundle") else per_rpc
            for seed in range(n):
                draw = KindCounter(seed)
                name, request = build(pb, draw)
                code, details, field = hostile.call(served.stub, name, request)
                sent += 1
                by_code[code.name] += 1
                by_kind.update(draw.kinds)
                p = hostile.problem(name, code, details, field)
                if p:
                    problems.append(p)
                if served.proc.poll() is not None:
                    crashes += 1
                    break
            if served.proc.poll() is not None:
                break
        info = served.stub.GetInfo(pb.GetInfoRequest(), timeout=10) if served.proc.poll() is None else None
    return {"sent": sent, "by_kind": dict(by_kind), "by_code": dict(by_code), "problems": problems[:10],
            "problem_count": len(problems), "crashes": crashes,
            "live_users_after": info.live_users if info else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="default: bundles/sample (built when missing)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None, help="PNG of the overload phases")
    args = p.parse_args()
    bundle = (args.bundle or sample_bundle()).resolve()
    q = args.quick
    started = time.perf_counter()
    details: dict = {"bundle": str(bundle), "machine": f"{platform.node()} {platform.machine()}, "
                     f"{os.cpu_count()} cores", "quick": q}

    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        print("1/4 hot swaps under load ...", flush=True)
        marked = scenarios.marked_copy(bundle, work / "marked", "B2")
        link = work / "current"
        link.symlink_to(bundle)
        with ServedBundle(link, device="cpu") as served:
            swap = scenarios.swap_under_load(served.target, served.proc.pid, [bundle, marked], swaps=4 if q else 10,
                                             link=link, threads=6)
        details["swap"] = swap

        print("2/4 kill -9 during Feedback/UpsertItems ...", flush=True)
        state = work / "kill9-state"
        with ServedBundle(bundle, device="cpu", extra_args=("--state-dir", str(state))) as served:
            crash = scenarios.kill9(served, state, min_events=400 if q else 2000, timeout_s=120)
        details["kill9"] = crash

        print("3/4 hostile input ...", flush=True)
        hostile_report = run_hostile(bundle, work, per_rpc=60 if q else 250)
        details["hostile"] = hostile_report

        print("4/4 overload ...", flush=True)
        with ServedBundle(bundle, device="cpu") as served:
            over = scenarios.overload(served.target, served.proc.pid, base_s=3.0, flood_s=5.0 if q else 10.0,
                                      flood_concurrency=400, deadline_s=1.0)
            over["server_alive_after"] = served.proc.poll() is None
        details["overload"] = over

    flood = over["flood"]
    admitted = flood["codes"].get("OK", 0) + flood["codes"].get("DEADLINE_EXCEEDED", 0)
    report = {
        "swap_requests": swap["requests"], "swap_failed": swap["failed"],
        "events_acked": crash["events_acked"], "events_lost": crash["events_lost"],
        "hostile_inputs": hostile_report["sent"],
        "server_crashes": hostile_report["crashes"] + (0 if over["server_alive_after"] else 1),
        "overload_rss_mb": round(over["rss_peak_mb"], 1),
        "overload_admitted_p99_ms": round(flood["ok_p99_ms"], 1),
        "seconds": round(time.perf_counter() - started, 1),
        "details": details,
    }
    print()
    print(table([
        {"part": "hot swap", "figure": f"{swap['requests']} requests over {swap['swaps']} swaps "
                                       f"({', '.join(sorted(set(swap['methods'])))})",
         "result": f"{swap['failed']} failed, {swap['mixed']} mixed bundles, median swap {swap['swap_s_median']:.2f}s"},
        {"part": "kill -9", "figure": f"{crash['events_acked']} events / {crash['items_acked']} upserts acknowledged",
         "result": f"{crash['events_lost']} events / {crash['items_lost']} upserts lost, "
                   f"{crash['half_applied_requests']} half-applied, torn tail {crash['torn_bytes']} B"},
        {"part": "hostile", "figure": f"{hostile_report['sent']} requests, every RPC",
         "result": f"{hostile_report['problem_count']} bad answers, {hostile_report['crashes']} crashes; "
                   f"codes {hostile_report['by_code']}"},
        {"part": "overload", "figure": f"{flood['sent_per_s']:.0f} calls/s offered = "
                                       f"{over['offered_over_sustainable']:.1f}x the sustainable {over['before']['ok_per_s']:.0f}/s",
         "result": f"admitted {admitted}: OK p99 {flood['ok_p99_ms']:.0f} ms, {flood['codes'].get('DEADLINE_EXCEEDED', 0)} "
                   f"missed the deadline; rejected {flood['codes'].get('RESOURCE_EXHAUSTED', 0)} (p50 "
                   f"{flood['rejected_p50_ms']:.0f} ms); peak RSS {over['rss_peak_mb']:.0f} MB "
                   f"(before {over['rss_before_mb']:.0f}); after: {over['recovered_over_before']:.2f}x the throughput"},
        {"part": "  probe", "figure": "4 ordinary callers (own process, back off when refused) during the flood",
         "result": f"codes {over['probe_during_flood']['codes']}; OK p50 {over['probe_during_flood']['ok_p50_ms']:.0f} ms, "
                   f"p99 {over['probe_during_flood']['ok_p99_ms']:.0f} ms"},
        {"part": "  server", "figure": "the server's own counts during the flood (search batcher)",
         "result": json.dumps(over["flood_server"])},
    ], ["part", "figure", "result"]))
    print("\nhostile inputs by kind:", json.dumps(hostile_report["by_kind"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=1))
    if args.plot:
        plot_overload(over, args.plot)
        print(f"plot: {args.plot}")


def plot_overload(over: dict, out: Path) -> None:
    """Answers per second by status, and client-seen latency, before / during / after the flood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("before", over["before"]), (f"flood ({over['offered_over_sustainable']:.0f}x)", over["flood"]),
              ("after", over["after"])]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(phases))
    bottom = [0.0] * len(phases)
    for code, colour in (("OK", "tab:green"), ("DEADLINE_EXCEEDED", "tab:orange"), ("RESOURCE_EXHAUSTED", "tab:red")):
        rates = [p["codes"].get(code, 0) / (p["sent"] / p["sent_per_s"]) if p["sent"] else 0 for _, p in phases]
        a.bar(x, rates, bottom=bottom, color=colour, label=code)
        bottom = [u + v for u, v in zip(bottom, rates)]
    a.set_xticks(list(x), [n for n, _ in phases])
    a.set_ylabel("answers per second")
    a.set_yscale("symlog", linthresh=100)
    a.set_title("Search answers by status (Sample bundle, 2-core CPU)")
    a.legend(fontsize=8)
    for key, style, label in (("ok_p50_ms", "o-", "OK p50"), ("ok_p99_ms", "s-", "OK p99"),
                              ("rejected_p50_ms", "^--", "rejected p50")):
        b.plot(list(x), [p[key] for _, p in phases], style, label=label)
    b.axhline(over["deadline_ms"], color="grey", linestyle=":", label="deadline")
    b.set_xticks(list(x), [n for n, _ in phases])
    b.set_ylabel("client-seen latency, ms")
    b.set_title("Latency (load generator on the same 2 cores)")
    b.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
