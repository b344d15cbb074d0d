"""`vaegen ingest`: datasets into Parquet shards on the storage root."""
from __future__ import annotations

import argparse

from vae_core.config import IngestOptions
from vae_core.data import FASHION_MNIST_DIR

from .args import add_progress_arg, add_storage_args, counted, storage_config
from .flags import add_flags, build

SOURCES = ("fashion-mnist", "image-folder", "parquet", "hf", "webdataset")   # cluster.data.sources.SOURCES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="write a dataset as Parquet shards under <root>/datasets/<name>/",
                       description="Read a dataset and write its splits as Parquet shards plus a manifest. "
                                   "A re-ingest under the same name replaces the dataset atomically: readers see "
                                   "the old one or the new one, and a failed ingest leaves the old one intact. "
                                   "Images: grey stays 1 channel, anything else becomes RGB (or --mode); 16-bit "
                                   "images are scaled to 8 bits (round(v / 257)), never clipped; alpha is "
                                   "composited onto black; --size HxW scales each image to cover HxW "
                                   "(antialiased) and centre-crops it. Labels must be integers >= 0.")
    p.add_argument("source", choices=SOURCES,
                   help="what to read: fashion-mnist (IDX files), image-folder (<class>/<image> labelled, or "
                        "flat: unlabelled), parquet or hf (Parquet files, a Hugging Face Hub layout "
                        "data/<split>-*.parquet, a save_to_disk folder), webdataset (tars)")
    p.add_argument("path", nargs="?", default=None,
                   help=f"input, local or s3://: the IDX folder (default {FASHION_MNIST_DIR}), an image folder, "
                        "a Parquet file or folder, a Hugging Face dataset folder, a .tar, a folder of them or a "
                        "brace pattern such as shards-{0000..0003}.tar")
    p.add_argument("--name", default=None,
                   help="dataset name (default: the source's name, or the image folder's own name)")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per Parquet shard (default: %(default)s)")
    add_flags(p, IngestOptions, title="reading the input")
    add_storage_args(p)
    add_progress_arg(p)
    p.set_defaults(run=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    from cluster.data.ingest import ingest_source
    manifest = ingest_source(args.source, args.path, storage_config(args), name=args.name,
                             shard_rows=args.shard_rows, progress=args.progress, options=build(IngestOptions, args))
    splits = ", ".join(f"{k}: {v['rows']:,} rows in {counted(len(v['shards']), 'shard')}" for k, v in manifest["splits"].items())
    for note in manifest.get("notes", ()):
        print(f"note: {note}")
    print(f"dataset {manifest['name']} {tuple(manifest['image_shape'])}: {splits}")
    skipped = manifest.get("skipped") or {}
    if skipped.get("count"):
        first = skipped["examples"][0]
        print(f"skipped {counted(skipped['count'], 'unreadable image')} (--skip-bad; named in the card), the first: "
              f"{first['name']}: {first['error']}")
    return 0
