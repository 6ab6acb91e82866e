"""Plot served Search throughput and p99 latency against closed-loop clients for serving_load.py runs
(e.g. one compute thread against two), with each run's in-process limit as a dashed line.

    python bench/plot_serving.py LABEL=RUN.json [LABEL=RUN.json ...] --out docs/serving_compute_threads.png
    python bench/plot_serving.py --tradeoff LABEL=RUN.json [...] --out docs/serving_new_vs_old.png

--tradeoff: one panel, q/s against p99 for every sweep of each run (the new default, the old defaults and
the old defaults with the fp32 encoder), each point labelled with its clients: what served_qps_p99_50ms
reads off (the highest point left of 50 ms).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(spec: str) -> tuple[str, dict]:
    """(label, serving_load result) of a LABEL=JSON argument (a run_all JSON: its details.serving)."""
    label, path = spec.split("=", 1)
    res = json.loads(Path(path).read_text())
    return label, res.get("details", {}).get("serving", res)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="LABEL=serving_load JSON (or a run_all JSON: its details.serving)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tradeoff", action="store_true", help="q/s against p99, every sweep of each run")
    args = p.parse_args()
    if args.tradeoff:
        tradeoff(args.runs, args.out)
        return
    fig, (ax_q, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for n, spec in enumerate(args.runs):
        label, res = _load(spec)
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


SWEEPS = (("served", "new default"), ("served_old_defaults", "old defaults"),
          ("served_old_fp32", "old defaults, fp32 encoder"))


def tradeoff(runs: list[str], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ("o-", "s--", "^:")
    for n, spec in enumerate(runs):
        label, res = _load(spec)
        for m, (key, name) in enumerate(SWEEPS):
            if key not in res:
                continue
            rows = res[key]["rows"]
            tag = f"{label}: {name} ({res[key]['backend']} {res[key]['served_dtype']})"
            ax.plot([r["p99_ms"] for r in rows], [r["qps"] for r in rows], styles[n % len(styles)], color=f"C{m}",
                    label=tag, alpha=0.9 if n == 0 else 0.6)
            for r in rows:
                ax.annotate(str(r["clients"]), (r["p99_ms"], r["qps"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
    ax.axvline(50, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency, ms (log; dotted: 50 ms; numbers: closed-loop clients)")
    ax.set_ylabel("served Search queries/s")
    ax.legend(fontsize=7)
    ax.set_title("Served Search, Home Depot bundle, 2-core CPU (server and load generator share it)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
