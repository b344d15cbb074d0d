"""Datasets on storage as Parquet shards: datasets/<name>/<split>/part-00000.parquet + datasets/<name>/_manifest.json.

Rows: id (int64), label (int64), pixels (fixed-size binary, C·H·W uint8 in CHW order). The manifest is written
last and lists every shard with its rows and sha256: a dataset without a manifest does not exist."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from vae_core.config import ModelConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError

from .storage import Storage

MANIFEST = "_manifest.json"
DEFAULT_SHARD_ROWS = 10_000


def dataset_key(name: str, *parts: str) -> str:
    return "/".join(("datasets", name, *parts))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def split_table(images: np.ndarray, labels: np.ndarray, first_id: int) -> pa.Table:
    n, c, h, w = images.shape
    flat = np.ascontiguousarray(images).reshape(n, c * h * w)
    pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(flat)])
    return pa.table({"id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
                     "label": pa.array(labels.astype(np.int64)),
                     "pixels": pixels})


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def ingest(storage: Storage, name: str, dataset: ArrayDataset, shard_rows: int = DEFAULT_SHARD_ROWS,
           progress: bool = True) -> dict:
    """Write every split as shards, then the manifest. Rewriting a dataset gives the same bytes."""
    if shard_rows <= 0:
        raise VaegenError(f"--shard-rows={shard_rows} must be > 0")
    shapes = {s.images.shape[1:] for s in dataset.splits.values()}
    if len(shapes) != 1:
        raise VaegenError(f"splits of {name!r} differ in image shape: {sorted(shapes)}")
    manifest = {"name": name, "image_shape": list(shapes.pop()), "label_names": list(dataset.label_names),
                "source": dataset.source, "created_at": time.time(), "splits": {}}
    total = sum(len(s.labels) for s in dataset.splits.values())
    with tqdm(total=total, unit="img", desc=f"ingest {name}", disable=not progress) as bar:
        for split, data in dataset.splits.items():
            shards = []
            for index, start in enumerate(range(0, len(data.labels), shard_rows)):
                stop = min(start + shard_rows, len(data.labels))
                body = table_bytes(split_table(data.images[start:stop], data.labels[start:stop], start))
                storage.publish(dataset_key(name, split, shard_name(index)), body)
                shards.append({"name": shard_name(index), "rows": stop - start, "first_id": start,
                               "last_id": stop - 1, "bytes": len(body),
                               "sha256": hashlib.sha256(body).hexdigest()})
                bar.update(stop - start)
            manifest["splits"][split] = {"rows": len(data.labels), "shards": shards}
    storage.publish(dataset_key(name, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def read_manifest(storage: Storage, name: str) -> dict:
    key = dataset_key(name, MANIFEST)
    if not storage.exists(key):
        known = [d for d in storage.list_dirs("datasets") if storage.exists(dataset_key(d, MANIFEST))]
        raise VaegenError(f"no dataset {name!r} in {storage.uri} (datasets there: {', '.join(known) or 'none'}; "
                          "run `vaegen ingest` first)")
    return json.loads(storage.read_bytes(key))


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of one split; a split the dataset lacks is a one-line error."""
    if split not in manifest["splits"]:
        raise VaegenError(f"dataset {manifest['name']!r} has no split {split!r} "
                          f"(splits: {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def shard_keys(storage: Storage, name: str, split: str) -> list[str]:
    return [dataset_key(name, split, s["name"]) for s in split_shards(read_manifest(storage, name), split)]


def table_arrays(table: pa.Table, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, uint8 images (N, C, H, W)) from a dataset table, without copying pixels twice."""
    pixels = table.column("pixels").combine_chunks()
    flat = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=len(pixels) * int(np.prod(image_shape)),
                         offset=pixels.offset * int(np.prod(image_shape)))
    return (table.column("id").to_numpy(), table.column("label").to_numpy(),
            flat.reshape(len(pixels), *image_shape))


@dataclass
class LoadedSplit:
    ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray             # uint8 (N, C, H, W)
    manifest: dict


def read_split(storage: Storage, name: str, split: str, limit: int = 0) -> LoadedSplit:
    """A whole split in memory, each shard's sha256 checked against the manifest."""
    manifest = read_manifest(storage, name)
    shape = tuple(manifest["image_shape"])
    parts = []
    for shard in split_shards(manifest, split):
        body = storage.read_bytes(dataset_key(name, split, shard["name"]))
        if hashlib.sha256(body).hexdigest() != shard["sha256"]:
            raise VaegenError(f"dataset shard {name}/{split}/{shard['name']} fails its sha256 check (corrupt)")
        parts.append(table_arrays(pq.read_table(io.BytesIO(body)), shape))
        if limit and sum(len(p[0]) for p in parts) >= limit:
            break
    ids, labels, images = (np.concatenate(x) for x in zip(*parts))
    if limit:
        ids, labels, images = ids[:limit], labels[:limit], images[:limit]
    return LoadedSplit(ids, labels, images, manifest)


def array_split_from_table(table: pa.Table) -> tuple[ArraySplit, tuple[int, int, int]]:
    """A Parquet table from outside (pixels+height/width/channels, or PNG `image`) → uint8 arrays."""
    from vae_core.images import decode_png
    cols = set(table.column_names)
    if "label" not in cols:
        raise VaegenError("input Parquet needs a 'label' column")
    labels = table.column("label").to_numpy().astype(np.int64)
    if "pixels" in cols and {"height", "width", "channels"} <= cols:
        c, h, w = (int(table.column(k)[0].as_py()) for k in ("channels", "height", "width"))
        for k, v in (("channels", c), ("height", h), ("width", w)):
            if len(set(table.column(k).to_pylist())) != 1:
                raise VaegenError(f"input Parquet rows differ in {k}: all images must have one shape")
        raw = b"".join(table.column("pixels").to_pylist())
        if len(raw) != len(labels) * c * h * w:
            raise VaegenError("input Parquet 'pixels' sizes do not match height×width×channels")
        return ArraySplit(np.frombuffer(raw, np.uint8).reshape(-1, c, h, w).copy(), labels), (c, h, w)
    if "image" in cols:
        values = table.column("image").to_pylist()
        arrays = [decode_png(v["bytes"] if isinstance(v, dict) else v) for v in values]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise VaegenError(f"input Parquet images differ in shape: {sorted(shapes)[:3]}")
        return ArraySplit(np.stack(arrays), labels), arrays[0].shape
    raise VaegenError("input Parquet needs 'pixels' (+ height, width, channels) or 'image' (PNG bytes) columns")


def bind_model_to_dataset(cfg: ModelConfig, manifest: dict, conditional: bool) -> ModelConfig:
    """Fill image shape and class count from the dataset; refuse a config that contradicts it."""
    shape = tuple(manifest["image_shape"])
    if cfg.image_shape is not None and tuple(cfg.image_shape) != shape:
        raise VaegenError(f"dataset {manifest['name']!r} holds images of shape {shape} (C,H,W) but the model "
                          f"config says {tuple(cfg.image_shape)}")
    classes = len(manifest["label_names"]) if conditional else 0
    if conditional and classes < 2:
        raise VaegenError(f"dataset {manifest['name']!r} has {classes} label(s): nothing to condition on")
    if cfg.num_classes and cfg.num_classes != classes:
        raise VaegenError(f"model config has {cfg.num_classes} classes but dataset {manifest['name']!r} "
                          f"has {len(manifest['label_names'])}")
    return dataclasses.replace(cfg, image_shape=shape, num_classes=classes)
