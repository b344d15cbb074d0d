"""`vaegen ingest`: datasets into Parquet shards on the storage root."""
from __future__ import annotations

import argparse

from vae_core.data import FASHION_MNIST_DIR

from .args import add_progress_arg, add_storage_args, counted, storage_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="write a dataset as Parquet shards under <root>/datasets/<name>/",
                       description="Read a dataset and write its splits as Parquet shards plus a manifest. "
                                   "A re-ingest under the same name replaces the dataset atomically: readers see "
                                   "the old one or the new one, and a failed ingest leaves the old one intact. "
                                   "Images: grey stays 1 channel, anything else becomes RGB; 16-bit images are "
                                   "scaled to 8 bits (round(v / 257)), never clipped; alpha is composited onto "
                                   "black. Labels must be integers >= 0.")
    p.add_argument("source", choices=["fashion-mnist", "image-folder", "parquet"], help="what to read")
    p.add_argument("path", nargs="?", default=None,
                   help=f"input: the IDX folder (default {FASHION_MNIST_DIR}), an image folder "
                        "(<class>/<image>.png), or a Parquet file, or a folder of them (local or s3://)")
    p.add_argument("--name", default=None,
                   help="dataset name (default: fashion-mnist, parquet, or the image folder's own name)")
    p.add_argument("--split", default="train", help="split name for image-folder/parquet input (default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per Parquet shard (default: %(default)s)")
    add_storage_args(p)
    add_progress_arg(p)
    p.set_defaults(run=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    from cluster.data.ingest import ingest_source
    manifest = ingest_source(args.source, args.path, storage_config(args), name=args.name, split=args.split,
                             shard_rows=args.shard_rows, progress=args.progress)
    splits = ", ".join(f"{k}: {v['rows']:,} rows in {counted(len(v['shards']), 'shard')}" for k, v in manifest["splits"].items())
    for note in manifest.get("notes", ()):
        print(f"note: {note}")
    print(f"dataset {manifest['name']} {tuple(manifest['image_shape'])}: {splits}")
    return 0
