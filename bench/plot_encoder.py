"""Plot encoder throughput by precision and batch size for one or more CPU kinds (bench/encoder_throughput.py
JSON files), one panel per kind, at the torch threads a server compute thread has.

    python bench/plot_encoder.py "AMX Xeon=out/encoder_native.json" "same CPU capped at AVX2=out/encoder_avx2.json" \\
        --dtypes "float32,bfloat16,bf16 autocast (untraced)" --out docs/encoder_precision.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="LABEL=FILE.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtypes", default="", help="comma-separated precisions to plot (default: all in the files)")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, json.loads(Path(f).read_text())) for label, f in (r.split("=", 1) for r in args.runs)]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, (label, res) in zip(axes[0], runs):
        threads = res.get("server_torch_threads", 1)
        rows = [r for r in res["rows"] if r["threads"] == threads]
        cases = sorted({(r["text"], r["batch"]) for r in rows}, key=lambda c: (c[0] != "query", c[1]))
        dtypes = [d for d in dict.fromkeys(r["dtype"] for r in rows) if not args.dtypes or d in args.dtypes.split(",")]
        width = 0.8 / len(dtypes)
        for i, d in enumerate(dtypes):
            got = {(r["text"], r["batch"]): r["items_per_s"] for r in rows if r["dtype"] == d}
            xs = [j + i * width for j in range(len(cases))]
            ax.bar(xs, [got.get(c, 0) for c in cases], width, label=d)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{'q' if t == 'query' else 'passage'} x{b}" for t, b in cases])
        h = res.get("host", {})
        flags = res.get("cpu_flags") or h.get("cpu_flags", [])
        bf16 = "native bf16" if res.get("native_bf16", h.get("native_bf16")) else "no native bf16"
        cap = h.get("isa_limits", {}).get("ONEDNN_MAX_CPU_ISA")
        # A capped run is described by its cap: the CPU's own flags are not what the kernels used.
        what = f"capped at {cap}" if cap else "flags: " + (" ".join(f for f in flags if "bf16" in f or "amx" in f) or "no bf16/amx")
        ax.set_title(f"{label}\n({bf16}; {threads} torch thread; {what})", fontsize=9)
        ax.set_ylabel("texts / s (median)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("MiniLM encoder throughput by precision (traced unless noted)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
