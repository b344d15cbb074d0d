"""The ingest engine's tasks: plain functions of (a row, the job) that Ray Data maps, or this process calls in
order (cluster/data/ingest.py). A row and a result are small JSON: pixels travel only between a task and storage.

- shard_task (one pass, where the plan knows every item's image count): the items of one shard, rows numbered
  from the plan, decoded, checked and written as the final shard.
- read_run + write_shard_task (two passes, where the count is known only once read: tars, Arrow files,
  --skip-bad): a run of items decoded and checked into uncompressed pieces under the ingest's _pending folder,
  then each shard cut from the pieces once the driver has numbered the rows."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cluster.data.datasets import table_arrays
from cluster.data.generations import GENERATION_PREFIX, PENDING, part_name, publish_encoded_shard
from cluster.data.readable import PIXELS_AS_IS, ShardWriter, split_table
from cluster.data.sources import IngestOptions, SourceItem, read_item
from cluster.store.layout import dataset_key
from cluster.store.storage import Storage
from vae_core.config import StorageConfig
from vae_core.data import bombs_refused
from vae_core.errors import VaegenError

RUN_IMAGES = 1024                  # at most, images per piece of a two-pass read: what one worker holds at once
SKIPPED_EXAMPLES = 5               # bad images named in the manifest and the card (--skip-bad)


@dataclass(frozen=True)
class IngestJob:
    """What every task needs (picklable)."""
    kind: str
    name: str
    generation: str
    storage: StorageConfig
    options: IngestOptions
    label_names: tuple[str, ...] | None

    def pieces_folder(self) -> str:
        return dataset_key(self.name, PENDING, f"{GENERATION_PREFIX}{self.generation}")


class CheckedImages:
    """A task's images as they are read: one shape, labels within the class names (a VaegenError otherwise);
    bad ones (--skip-bad) and notes counted for the task's record."""

    def __init__(self, job: IngestJob):
        self.job, self.first, self.bad, self.examples, self.notes = job, None, 0, [], Counter()

    def read(self, items: Iterable[Sequence]) -> Iterator[tuple[np.ndarray, int]]:
        """(uint8 (C, H, W) pixels, label) of every good image of the items (SourceItems, or their fields as a
        spec's JSON lists), in order."""
        job = self.job
        with bombs_refused():
            for fields in items:
                for image in read_item(job.kind, SourceItem(*fields), job.storage, job.options):
                    if image.pixels is None:
                        self.bad += 1
                        if len(self.examples) < SKIPPED_EXAMPLES:
                            self.examples.append({"name": image.name, "error": image.error})
                        continue
                    if self.first is None:
                        self.first = (image.name, image.pixels.shape)          # the record's JSON makes it a list
                    elif image.pixels.shape != self.first[1]:
                        raise VaegenError(mixed_shapes(self.first, (image.name, image.pixels.shape)))
                    check_label(image.name, image.label, job.label_names)
                    if image.note:
                        self.notes[image.note] += 1
                    yield image.pixels, image.label if job.label_names is not None else -1

    def record(self) -> dict:
        return {"first": self.first, "bad": self.bad, "examples": self.examples, "notes": dict(self.notes)}


def check_label(name: str, label: int, label_names: tuple[str, ...] | None) -> None:
    if label_names is None:
        return
    if not 0 <= label < len(label_names):
        raise VaegenError(f"image {name} has label {label} but the dataset has {len(label_names)} class names "
                          f"(labels 0..{len(label_names) - 1})")


def mixed_shapes(first: tuple[str, list], other: tuple[str, list]) -> str:
    (a, (ca, ha, wa)), (b, (cb, hb, wb)) = first, other
    if (ha, wa) != (hb, wb):
        return (f"images differ in size: {a} is {ha}x{wa} but {b} is {hb}x{wb}: pass --size HxW to resize them "
                "all to one size")
    return (f"images differ in channels: {a} has {ca} but {b} has {cb}: pass --mode L or --mode RGB")


# -- one pass ----------------------------------------------------------------------------------------------
def shard_task(row: dict, job: IngestJob) -> dict:
    """One final shard: its items' images (exactly the rows the plan counted), written with the plan's ids."""
    spec = json.loads(row["spec"])
    rows, checked, writer = spec["rows"], CheckedImages(job), None
    for pixels, label in checked.read(spec["items"]):
        if writer is None:
            writer = ShardWriter(pixels.shape, job.label_names or (), spec["first_id"])
        elif writer.rows == rows:
            raise changed_input(spec)                               # more than the plan counted
        writer.add(pixels, label)
    if writer is None or writer.rows != rows:
        raise changed_input(spec)
    record = publish_encoded_shard(Storage(job.storage), job.name, spec["split"],
                                   part_name(spec["index"], job.generation), writer.finish(), rows, spec["first_id"])
    return {"record": json.dumps({"split": spec["split"], "index": spec["index"], "shard": record,
                                  **checked.record()})}


def changed_input(spec: dict) -> VaegenError:
    return VaegenError(f"{spec['items'][0][1]}: the input changed while it was read (shard {spec['index']} of "
                       f"split {spec['split']!r} should hold {spec['rows']} images): rerun the ingest")


# -- two passes ----------------------------------------------------------------------------------------------
def read_run(row: dict, job: IngestJob) -> dict:
    """One run of items: decoded, checked, written as pieces of at most RUN_IMAGES images; its record."""
    storage, pieces, checked = Storage(job.storage), [], CheckedImages(job)
    images, labels = [], []

    def flush():
        key = f"{job.pieces_folder()}/{row['split']}/run-{row['run']:07d}-{len(pieces):05d}.parquet"
        # Scratch, not a published object: written in place, unsynced (a killed ingest's pieces are collected).
        path = storage.path(key)
        if not storage.is_s3:
            storage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(split_table(np.stack(images), np.asarray(labels, np.int64), 0), path, filesystem=storage.fs,
                       compression="none", **PIXELS_AS_IS)
        pieces.append({"key": key, "rows": len(images)})
        images.clear(), labels.clear()

    for pixels, label in checked.read(json.loads(row["items"])):
        images.append(pixels)
        labels.append(label)
        if len(images) >= RUN_IMAGES:
            flush()
    if images:
        flush()
    return {"record": json.dumps({"run": row["run"], "split": row["split"], "pieces": pieces, **checked.record()})}


def write_shard_task(row: dict, job: IngestJob) -> dict:
    """One shard from the pieces' rows it covers; its manifest record (as JSON)."""
    storage = Storage(job.storage)
    spec = json.loads(row["spec"])
    shape = tuple(spec["shape"])
    writer = ShardWriter(shape, job.label_names or (), spec["first_id"])
    for key, start, stop in spec["pieces"]:
        _, labels, images = table_arrays(pq.read_table(storage.path(key), filesystem=storage.fs), shape)
        writer.add_arrays(images[start:stop], labels[start:stop])
    record = publish_encoded_shard(storage, job.name, spec["split"], part_name(spec["index"], job.generation),
                                   writer.finish(), writer.rows, spec["first_id"])
    return {"record": json.dumps({"split": spec["split"], "index": spec["index"], "shard": record})}
