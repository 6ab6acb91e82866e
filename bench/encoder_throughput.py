"""Benchmark 1: encoder throughput by batch size, fp32 vs bf16 and int8 on CPU (fp16 vs fp32 on CUDA),
for short queries and for catalog passages. Each precision runs as the server runs it (TorchScript-traced
where it can be: CPU fp32 and int8).

    python bench/encoder_throughput.py [--bundle DIR] [--device cpu|cuda] [--quick] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchutil import bench_bundle, median_s, table


def run(bundle_dir: Path, device: str = "cpu", quick: bool = False) -> dict:
    import pandas as pd

    from common.encoding import TextEncoder, cpu_supports_bf16

    items = pd.read_parquet(bundle_dir / "items.parquet")
    titles = items["title"].astype(str).tolist()
    queries = [" ".join(t.split()[:3]) for t in titles]  # short, query-like
    passages = [". ".join(p for p in (r.title, r.brand, r.category, r.description) if p)
                for r in items.itertuples()]
    dtypes = ("float16", "float32") if device.startswith("cuda") else ("float32", "bfloat16", "int8")
    sizes = (1, 8, 32) if quick else (1, 8, 32, 128)
    rows = []
    for dtype in dtypes:
        enc = TextEncoder(bundle_dir / "encoder", device=device, dtype=dtype, trace=True)
        for kind, texts in (("query", queries), ("passage", passages)):
            for bs in sizes:
                if kind == "passage" and bs == 1 and quick:
                    continue
                n = max(bs, 64 if quick else 128)
                batch = (texts * (n // len(texts) + 1))[:n]
                sec = median_s(lambda: enc.encode(batch, batch_size=bs), repeat=3 if quick else 5)
                rows.append({"dtype": dtype, "traced": enc.traced is not None, "text": kind, "batch": bs,
                             "items_per_s": n / sec})
    base = {(r["text"], r["batch"]): r["items_per_s"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        r["vs_float32"] = r["items_per_s"] / base[(r["text"], r["batch"])]
    return {"device": device, "native_bf16": cpu_supports_bf16() if device == "cpu" else None, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = run(args.bundle or bench_bundle(), args.device, args.quick)
    print(f"encoder throughput on {res['device']} (native bf16: {res['native_bf16']}; medians)")
    cols = ["dtype", "traced", "text", "batch", "items_per_s"] + [k for k in res["rows"][0] if k.startswith("vs_")]
    print(table(res["rows"], cols))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
