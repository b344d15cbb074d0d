"""What makes a dataset folder readable without vaegen: the shards' Hugging Face features, the readable view of
the current generation, and the dataset card.

- Every shard carries the Hugging Face features in its Parquet schema metadata (`huggingface`: `label` a
  ClassLabel with the class names, or a plain int64 for an unlabelled dataset, whose labels are all -1), and the
  image shape (`vaegen.image_shape`, C,H,W: `pixels` is C·H·W uint8 bytes in CHW order).
- The view: after each commit, `<split>/part-00000-of-00003.parquet` are the current generation's shards, as hard
  links on a local root (no byte copied) or server-side copies on S3 (no byte through the client, but stored
  twice); view files of an older generation are removed. The generations themselves live in `__g-<id>/` folders,
  which pyarrow (`_`) and Hugging Face `datasets` (`__`) both skip, so `pandas.read_parquet(<dataset>/<split>)`
  and `datasets.load_dataset(<dataset>)` read the current rows. A temp link left by an update killed midway is
  collected by the next update once older than the generations' grace.
- The card, README.md (the file `datasets` reads): its YAML header maps each split to its view files, the body
  says what the rows are and what the ingest skipped.
The view and card follow the commit (the manifest swap); vaegen's own readers never use them. A reader of the
raw folder reading while a re-ingest updates the view may see both generations' files; after it, only the new."""
from __future__ import annotations

import io
import json
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.store.layout import dataset_key
from cluster.store.local_files import fsync_dir
from cluster.store.storage import Storage
from vae_core.errors import VaegenError

KEEP_SUPERSEDED_S = 24 * 3600.0     # a superseded generation, and a view's stale temp file, outlive their commit

VIEW_RECORD = "_view.json"          # the generation the view shows, written after the view is complete
CARD = "README.md"
VIEW_PREFIX = "part-"
TEMP_PREFIX = "_tmp-"               # a view file being swapped in (`_`: readers skip it); a stale one is collected
# Parquet's defaults would try a dictionary of every image and keep min/max pixels per page: hashing and comparing
# kilobytes a row for nothing (images rarely repeat, and no reader filters on pixels).
PIXELS_AS_IS = {"use_dictionary": ["label"], "write_statistics": ["id", "label"]}
ROW_GROUP_BYTES = 16 << 20          # a shard's row group, in pixels: what its writer holds and a reader decodes at once


def hf_features(label_names: tuple[str, ...] | list[str]) -> dict:
    label = ({"names": list(label_names), "_type": "ClassLabel"} if label_names
             else {"dtype": "int64", "_type": "Value"})
    return {"id": {"dtype": "int64", "_type": "Value"}, "label": label, "pixels": {"dtype": "binary", "_type": "Value"}}


def split_table(images: np.ndarray, labels: np.ndarray, first_id: int) -> pa.Table:
    n, c, h, w = images.shape
    flat = np.ascontiguousarray(images).reshape(n, c * h * w)
    pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(flat)])
    return pa.table({"id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
                     "label": pa.array(labels.astype(np.int64)),
                     "pixels": pixels})


class ShardWriter:
    """A dataset shard, encoded a row group at a time: id, label, pixels, zstd, the features and image shape in its
    schema metadata. Its images are added one by one or as arrays (each copied once, into the group); the writer
    holds one group's pixels and the shard's encoded bytes, never the shard's pixels: a shard of --shard-rows large
    images would otherwise be a task's largest allocation, touched page by page."""

    def __init__(self, image_shape: tuple[int, ...] | list[int], label_names, first_id: int):
        self.first_id = first_id
        self.rows, self.written = 0, 0                  # rows added so far; rows encoded (the group holds the rest)
        self.group = np.empty((max(1, ROW_GROUP_BYTES // int(np.prod(image_shape))), *image_shape), np.uint8)
        self.labels = np.empty(len(self.group), np.int64)
        schema = split_table(self.group[:0], self.labels[:0], 0).schema.with_metadata({
            "huggingface": json.dumps({"info": {"features": hf_features(label_names)}}),
            "vaegen.image_shape": json.dumps(list(image_shape))})
        self.sink = io.BytesIO()
        self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd", **PIXELS_AS_IS)

    def add(self, pixels: np.ndarray, label: int) -> None:
        """One uint8 (C, H, W) image of the shard's shape and its label, as the next row."""
        filled = self.rows - self.written
        self.group[filled], self.labels[filled] = pixels, label
        self.rows += 1
        if filled + 1 == len(self.group):
            self._write(self.group, self.labels)

    def add_arrays(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Rows in memory, (N, C, H, W) and (N,), as the next rows, in groups of the same size as add's."""
        at = 0
        while at < len(labels):
            filled = self.rows - self.written
            take = min(len(self.group) - filled, len(labels) - at)
            self.group[filled:filled + take], self.labels[filled:filled + take] = \
                images[at:at + take], labels[at:at + take]
            self.rows, at = self.rows + take, at + take
            if filled + take == len(self.group):
                self._write(self.group, self.labels)

    def _write(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.writer.write_table(split_table(images, labels, self.first_id + self.written))
        self.written += len(labels)

    def finish(self) -> bytes:
        """The shard's bytes (its `rows` rows)."""
        if self.rows > self.written:
            self._write(self.group[:self.rows - self.written], self.labels[:self.rows - self.written])
        self.writer.close()
        return self.sink.getvalue()


def shard_bytes(images: np.ndarray, labels: np.ndarray, first_id: int, label_names) -> bytes:
    """A dataset shard of arrays in memory (see ShardWriter)."""
    writer = ShardWriter(images.shape[1:], label_names, first_id)
    writer.add_arrays(images, labels)
    return writer.finish()


def view_name(index: int, count: int) -> str:
    return f"{VIEW_PREFIX}{index:05d}-of-{count:05d}.parquet"


def publish_view(storage: Storage, manifest: dict, now: float | None = None) -> None:
    """Make the view and the card show `manifest`'s generation (idempotent; a no-op when they already do), and
    collect the temp links of updates killed midway (`now`: the time their age is taken at)."""
    name = manifest["name"]
    record_key = dataset_key(name, VIEW_RECORD)
    if shown_generation(storage, record_key) == manifest["generation"]:
        return
    wanted = {}
    for split, info in manifest["splits"].items():
        for i, shard in enumerate(info["shards"]):
            wanted[dataset_key(name, split, view_name(i, len(info["shards"])))] = dataset_key(name, split, shard["name"])
    for view_key, shard_key in wanted.items():
        place(storage, shard_key, view_key)
    for split in storage.list_dirs(dataset_key(name)):
        if not split.startswith(("_", ".")):
            for entry in storage.list(dataset_key(name, split)):
                base = entry.key.rsplit("/", 1)[-1]
                if (entry.key not in wanted and base.startswith(VIEW_PREFIX)) or \
                        (base.startswith(TEMP_PREFIX) and stale_temp(storage, entry.key, now or time.time())):
                    storage.delete(entry.key)
    storage.publish(dataset_key(name, CARD), card(manifest).encode())
    storage.publish(record_key, json.dumps({"generation": manifest["generation"]}).encode())


def shown_generation(storage: Storage, record_key: str) -> str | None:
    """The generation the view shows; None when there is no view record or it is unreadable (the view is redone)."""
    try:
        return json.loads(storage.read_bytes(record_key)).get("generation")
    except (VaegenError, ValueError, AttributeError):
        return None


def stale_temp(storage: Storage, key: str, now: float) -> bool:
    """A temp link older than the generations' grace: left by an update killed between its link and its rename.
    Its age is its inode's ctime (a link's mtime is its shard's, however old): making the link sets it, so a live
    update's temp link is never that old."""
    if storage.is_s3:
        return False                                   # S3's view is copied server-side: no temp object is made
    try:
        return now - os.stat(storage.path(key)).st_ctime > KEEP_SUPERSEDED_S
    except FileNotFoundError:
        return False                                   # a concurrent update renamed it into the view meanwhile


def place(storage: Storage, source: str, dest: str) -> None:
    """`dest` becomes `source`'s bytes: a hard link swapped in by one rename locally, a server-side copy on S3."""
    if storage.is_s3:
        storage.copy(source, dest)
        return
    src, dst = storage.path(source), storage.path(dest)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    temp = os.path.join(os.path.dirname(dst), f"{TEMP_PREFIX}{uuid.uuid4().hex}")   # one per call; `_`: readers skip it
    os.link(src, temp)
    os.replace(temp, dst)
    fsync_dir(os.path.dirname(dst))


def card(manifest: dict) -> str:
    """README.md: a YAML header Hugging Face `datasets` reads (one config, each split's view files), then what the
    rows are."""
    splits = manifest["splits"]
    head = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        head += [f"  - split: {json.dumps(split)}", f"    path: {json.dumps(f'{split}/{VIEW_PREFIX}*.parquet')}"]
    head += ["---", ""]
    c, h, w = manifest["image_shape"]
    names = manifest["label_names"]
    body = [f"# {manifest['name']}", "",
            (f"A vaegen dataset: {sum(s['rows'] for s in splits.values()):,} images of {h}×{w} pixels, "
             f"{'grey' if c == 1 else 'RGB'}, from {manifest['source']} (generation {manifest['generation']})."), "",
            "| split | rows |", "|---|---|", *(f"| {k} | {v['rows']:,} |" for k, v in splits.items()), "",
            ("Columns: `id` (int64, the row's position in its split), `label` "
             + (f"(ClassLabel: {', '.join(names)})" if names else "(-1: the dataset is unlabelled)")
             + f", `pixels` ({c}·{h}·{w} uint8 bytes in C,H,W order: "
               f"`numpy.frombuffer(row['pixels'], numpy.uint8).reshape({c}, {h}, {w})`)."), ""]
    skipped = manifest.get("skipped") or {}
    if skipped.get("count"):
        body += [f"Skipped {skipped['count']:,} unreadable image(s) (--skip-bad), among them:", "",
                 *(f"- {e['name']}: {e['error']}" for e in skipped["examples"]), ""]
    body += [f"- {note}" for note in manifest.get("notes", ())]
    return "\n".join(head + body) + "\n"
