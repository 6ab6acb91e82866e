"""Plot of docs/bench_ann_1m*.json: recall@100 against speed over exact search, per index type (docs/ann_1m_tradeoff.png)."""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
alt = json.load(open("docs/bench_ann_1m_alternatives.json")); sw = json.load(open("docs/bench_ann_1m_ivfpq_sweep.json"))
fin = json.load(open("docs/bench_ann_1m.json"))["rows"][-1]
fig, ax = plt.subplots(figsize=(7, 4.5))
h = alt["hnsw_M64_efC200"]["rows"]; ax.plot([r["speedup"] for r in h], [r["recall"] for r in h], "o-", label="HNSW M64 efC200 (efSearch 256-768)")
i = alt["ivf4096_flat"]["rows"]; ax.plot([r["speedup"] for r in i], [r["recall"] for r in i], "s-", label="IVF4096,Flat (nprobe 16-256)")
for key, mark in (("IVF4096,PQ96x4fs,RFlat", "^"), ("IVF4096,PQ192x4fs,RFlat", "v")):
    rows = [r for s in ("sweep_1", "sweep_2") for r in sw[s]["rows"] if r["spec"] == key]
    ax.scatter([r["speedup"] for r in rows], [r["recall"] for r in rows], marker=mark, label=key + " (nprobe x k_factor grid)")
ax.scatter([fin["speedup"]], [fin["recall@100"]], s=160, facecolors="none", edgecolors="k", linewidths=2,
           label=f"built index on test queries: nprobe {fin['nprobe']}, k_factor {fin['k_factor']}")
ax.axhline(0.98, color="grey", ls="--", lw=1); ax.axvline(10, color="grey", ls="--", lw=1)
ax.fill_between([10, 60], 0.98, 1.0, color="green", alpha=0.07)
ax.set_xscale("log"); ax.set_ylim(0.85, 1.0); ax.set_xlim(1.5, 60)
ax.set_xticks([2, 3, 5, 10, 20, 40]); ax.set_xticklabels(["2", "3", "5", "10", "20", "40"]); ax.minorticks_off()
ax.set_xlabel("speed vs exact search (x, log scale)"); ax.set_ylabel("recall@100 vs exact")
ax.set_title("ANN at 1M vectors, real Home Depot queries, 2-core CPU (target: shaded)")
ax.legend(fontsize=7, loc="lower left"); fig.tight_layout(); fig.savefig("docs/ann_1m_tradeoff.png", dpi=110)
