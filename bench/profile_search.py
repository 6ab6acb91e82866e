"""Where the time of a Search goes: cProfile over the in-process pipeline (encode + retrieve + rerank
at batch 32, no gRPC) and a per-stage split from the engine's own timers.

    python bench/profile_search.py [--bundle DIR] [--batches 40] [--batch-size 32] [--dtype auto|int8] [--out PROFILE.txt]

Prints the stage split (encode / retrieve / rank, medians per batch) and the functions with the most
own time. Used to find the largest costs before changing anything; docs/performance.md quotes before/after.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
from pathlib import Path

from benchutil import bench_bundle
from serving_load import queries, search_engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="encoder precision (the server's --dtype)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from server.types import SearchQuery

    bundle_dir = args.bundle or bench_bundle()
    engine = search_engine(bundle_dir, dtype=args.dtype)
    bundle = engine.bundle
    qs = queries(bundle_dir, args.batches * args.batch_size)
    bs = args.batch_size
    batches = [[SearchQuery(text=q, k=10) for q in qs[i:i + bs]] for i in range(0, len(qs) - bs + 1, bs)]
    engine.search_batch(batches[0])
    prof = cProfile.Profile()
    stages = []
    prof.enable()
    for b in batches:
        out = engine.search_batch(b)
        stages.append((out[0].encode_s, out[0].retrieve_s, out[0].rank_s))
    prof.disable()
    med = [statistics.median(s[i] for s in stages) * 1000 for i in range(3)]
    total = sum(med)
    head = (f"bundle {bundle.version} ({len(bundle.items)} items), {len(batches)} batches of {bs}, "
            f"encoder {args.dtype}\n"
            f"median ms per batch: encode {med[0]:.1f} ({100 * med[0] / total:.0f}%), retrieve {med[1]:.1f} "
            f"({100 * med[1] / total:.0f}%), rank {med[2]:.1f} ({100 * med[2] / total:.0f}%); "
            f"{bs / (total / 1000):.0f} queries/s\n")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    text = head + buf.getvalue()
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
