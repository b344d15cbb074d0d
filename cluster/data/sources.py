"""What ingest reads, and how: plan_source lists an input (never decoding an image) into small picklable items,
and read_item reads one item into decoded, shaped images. The engine (ingest.py) runs read_item on Ray Data.

Sources, local or s3://: fashion-mnist (IDX files), image-folder (`<class>/<image>` labelled, or flat), parquet
and hf (Parquet files, a Hugging Face Hub layout, a save_to_disk folder: source_parquet.py), webdataset (tars:
source_tars.py)."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.data.source_files import (
    plan_fashion_mnist,
    plan_image_folder,
    read_fashion_mnist_item,
    read_image_file_item,
)
from cluster.data.source_io import IngestOptions, SourceImage, SourceItem, SourcePlan
from cluster.data.source_parquet import plan_table_source, read_table_item
from cluster.data.source_tars import plan_webdataset, read_tar_item
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError
from vae_core.names import NAME_RULE, is_valid_name

__all__ = ["SOURCES", "IngestOptions", "SourceImage", "SourceItem", "SourcePlan", "plan_source", "read_item"]

SOURCES = ("fashion-mnist", "image-folder", "parquet", "hf", "webdataset")
WHAT_PATH = {"image-folder": "an image folder, local or s3://", "parquet": "a Parquet file or folder, local or s3://",
             "hf": "a Hugging Face dataset folder (data/<split>-*.parquet, or save_to_disk's), local or s3://",
             "webdataset": "a .tar, a folder of them, or a brace pattern such as shards-{0000..0003}.tar"}


def plan_source(kind: str, uri: str | None, storage_cfg: StorageConfig, options: IngestOptions) -> SourcePlan:
    """Lists the input (never decodes images); bad names/paths/URIs are one-line VaegenErrors."""
    if kind not in SOURCES:
        raise VaegenError(f"unknown ingest source {kind!r} (one of {', '.join(SOURCES)})")
    if kind != "fashion-mnist" and not uri:
        raise VaegenError(f"ingest {kind} needs the input's path ({WHAT_PATH[kind]})")
    planners = {"fashion-mnist": plan_fashion_mnist, "image-folder": plan_image_folder,
                "webdataset": plan_webdataset}
    with collector_paused():
        plan = (planners[kind](uri, storage_cfg, options) if kind in planners
                else plan_table_source(kind, uri, storage_cfg, options))
    for split in dict.fromkeys(item.split for item in plan.items):
        if not is_valid_name(split):
            raise VaegenError(f"{uri}: its files name a split {split!r}, which is not a valid name ({NAME_RULE})")
    return plan


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a plan makes its few objects per input file, none of them in a
    cycle: each full collection would otherwise walk every live object of the process (Ray's and pyarrow's
    included) again as they pile up, which costs more than the listing itself on a large folder."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_item(plan_kind: str, item: SourceItem, storage_cfg: StorageConfig,
              options: IngestOptions) -> Iterator[SourceImage]:
    """Reads one item: yields every image in it, decoded and shaped (options.size/mode applied). A bad image
    raises VaegenError("cannot read image <name>: <why>"), or with options.skip_bad is yielded with pixels None."""
    if plan_kind == "fashion-mnist":
        return read_fashion_mnist_item(item, storage_cfg, options)
    if plan_kind == "image-folder":
        return read_image_file_item(item, storage_cfg, options)
    if plan_kind in ("parquet", "hf"):
        return read_table_item(item, storage_cfg, options)
    if plan_kind == "webdataset":
        return read_tar_item(item, storage_cfg, options)
    raise VaegenError(f"unknown ingest source {plan_kind!r} (one of {', '.join(SOURCES)})")
