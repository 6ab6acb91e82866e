"""Benchmark 1: encoder throughput by precision, batch size and thread count, and how far each precision's
vectors are from fp32's -- the figures behind the CPU precision default (docs/cpu.md).

Every precision runs as the server runs it (TorchScript-traced on CPU: fp32, bf16, int8; fp16 vs fp32 on
CUDA), for short queries and for catalog passages, at the torch threads one server compute thread has
(server.config.compute_plan: 1 on a 2-core machine) and at every core (catalog builds). The baseline is
traced fp32 in the same run (`vs_float32`); where the CPU has native bf16 the earlier default there,
untraced bf16 autocast, runs too. `cos_*` compare each precision's query vectors with fp32's.

    python bench/encoder_throughput.py [--bundle DIR] [--device cpu|cuda] [--quick] [--json OUT]
    # the same machine run as a CPU without AVX-512/AMX (oneDNN, MKL and ATen capped at AVX2):
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 SEARCHREC_CPU_BF16=0 \\
        python bench/encoder_throughput.py --quick --json out/encoder_avx2.json
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from benchutil import bench_bundle, host, median_s, table, write_json


def texts_of(bundle_dir: Path) -> tuple[list[str], list[str]]:
    """(short query-like texts, catalog passages) from a bundle's items."""
    import pandas as pd

    items = pd.read_parquet(bundle_dir / "items.parquet")
    titles = items["title"].astype(str).tolist()
    queries = [" ".join(t.split()[:3]) for t in titles]
    passages = [". ".join(p for p in (r.title, r.brand, r.category, r.description) if p) for r in items.itertuples()]
    return queries, passages


def variants(bundle_dir: Path, device: str) -> list[tuple[str, object, object]]:
    """(name, encoder, context to run it in) for every precision measured on this device."""
    import torch

    from common.cpu import cpu_supports_bf16
    from common.encoding import TextEncoder

    enc_dir = bundle_dir / "encoder"
    if device.startswith("cuda"):
        return [(d, TextEncoder(enc_dir, device=device, dtype=d), nullcontext()) for d in ("float32", "float16")]
    out = [(d, TextEncoder(enc_dir, device=device, dtype=d, trace=True), nullcontext())
           for d in ("float32", "bfloat16", "int8")]
    if cpu_supports_bf16():  # the previous default on such CPUs, for comparison in the same run
        eager = TextEncoder(enc_dir, device=device, dtype="float32")
        out.append(("bf16 autocast (untraced)", eager, torch.autocast("cpu", dtype=torch.bfloat16)))
    return out


def run(bundle_dir: Path, device: str = "cpu", quick: bool = False) -> dict:
    import torch

    from server.config import ServerConfig, available_cores, compute_plan

    queries, passages = texts_of(bundle_dir)
    sizes = (1, 8, 32) if quick else (1, 4, 8, 32, 128)
    per_thread = compute_plan(ServerConfig(bundle=bundle_dir))[1]
    thread_counts = sorted({per_thread, available_cores()}) if device == "cpu" else [torch.get_num_threads()]
    probe = (queries * (512 // max(len(queries), 1) + 1))[:512]
    found = variants(bundle_dir, device)
    ref = found[0][1].encode(probe, batch_size=64)  # float32
    rows = []
    before = torch.get_num_threads()
    try:
        for name, enc, ctx in found:
            with ctx:
                vecs = enc.encode(probe, batch_size=64)
            cos = np.sum(vecs * ref, axis=1)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for kind, texts in (("query", queries), ("passage", passages)):
                    for bs in sizes:
                        if kind == "passage" and bs < 8:
                            continue  # catalogs are encoded in batches
                        n = max(bs, 64 if quick else 128)
                        batch = (texts * (n // len(texts) + 1))[:n]

                        def once(enc=enc, ctx=ctx, batch=batch, bs=bs):
                            with ctx:
                                enc.encode(batch, batch_size=bs)

                        sec = median_s(once, repeat=3 if quick else 5, min_time=0.5 if quick else 1.0)
                        rows.append({"dtype": name, "traced": enc.traced is not None, "threads": threads, "text": kind,
                                     "batch": bs, "items_per_s": n / sec, "cos_min": float(cos.min()),
                                     "cos_mean": float(cos.mean())})
    finally:
        torch.set_num_threads(before)
    base = {(r["threads"], r["text"], r["batch"]): r["items_per_s"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        r["vs_float32"] = r["items_per_s"] / base[(r["threads"], r["text"], r["batch"])]
    return {"device": device, "server_torch_threads": per_thread, "rows": rows, "host": host()}


def summary(res: dict) -> str:
    h = res["host"]
    head = (f"encoder throughput on {res['device']}: {h['cpu_model'] or 'unknown CPU'}, native bf16 "
            f"{'yes' if h['native_bf16'] else 'no'} ({h['native_bf16_source']}), flags {' '.join(h['cpu_flags'])}"
            f"{', limits ' + str(h['isa_limits']) if h['isa_limits'] else ''}; a server compute thread has "
            f"{res['server_torch_threads']} torch thread(s); medians")
    cols = ["dtype", "traced", "threads", "text", "batch", "items_per_s", "vs_float32", "cos_min", "cos_mean"]
    return head + "\n" + table(res["rows"], cols)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    res = run(args.bundle or bench_bundle(), args.device, args.quick)
    print(summary(res))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
