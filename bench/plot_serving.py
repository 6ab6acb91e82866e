"""Plot served Search throughput and p99 latency against closed-loop clients for serving_load.py runs
(e.g. one compute thread against two), with each run's in-process limit as a dashed line.

    python bench/plot_serving.py LABEL=RUN.json [LABEL=RUN.json ...] --out docs/serving_compute_threads.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="LABEL=serving_load JSON (or a run_all JSON: its details.serving)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    fig, (ax_q, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for n, spec in enumerate(args.runs):
        label, path = spec.split("=", 1)
        res = json.loads(Path(path).read_text())
        res = res.get("details", {}).get("serving", res)
        rows = res["served"]["rows"]
        clients = [r["clients"] for r in rows]
        color = f"C{n}"
        ax_q.plot(clients, [r["qps"] for r in rows], "o-", color=color, label=f"{label}: batching on")
        off = res["unbatched_32"]
        ax_q.plot([off["clients"]], [off["qps"]], "x", ms=9, color=color, label=f"{label}: max batch 1")
        ax_q.axhline(res["in_process"]["limit_qps"], color=color, ls="--", lw=1)
        ax_p.plot(clients, [r["p99_ms"] for r in rows], "o-", color=color, label=label)
    ax_p.axhline(50, color="grey", ls=":", lw=1)
    for ax in (ax_q, ax_p):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients)
        ax.set_xticklabels([str(c) for c in clients])
        ax.set_xlabel("closed-loop gRPC clients")
    ax_q.set_ylabel("Search queries/s (dashed: in-process limit)")
    ax_p.set_ylabel("p99 latency (ms; dotted: 50 ms)")
    ax_q.legend(fontsize=7)
    ax_p.legend(fontsize=7)
    fig.suptitle("Served Search, Home Depot bundle, 2-core CPU (server and load generator share it)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
