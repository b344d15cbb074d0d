"""Datasets on storage, read back: a manifest, then the shards it names (sha256-checked); arrays in memory
written as a dataset (`ingest`). The layout and the commit protocol: cluster/data/generations.py."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vae_core.progress import Progress as tqdm      # plain lines when not on a terminal

from cluster.data.generations import (
    DEFAULT_SHARD_ROWS,
    KEEP_SUPERSEDED_S,
    LAYOUT,
    begin_generation,
    commit_generation,
    current_manifest,
    new_manifest,
    parse_manifest,
    part_name,
    write_shard,
)
from cluster.store.layout import DATASETS, dataset_key, dataset_manifest_key
from cluster.store.storage import Storage
from vae_core.config import MAX_CLASSES, ModelConfig
from vae_core.data import ArrayDataset
from vae_core.errors import VaegenError
from vae_core.names import check_name


# -- ingest: write a generation, then commit it --------------------------------------------------------
def check_dataset(name: str, dataset: ArrayDataset, shard_rows: int) -> tuple[int, ...]:
    """Everything about the input that can be wrong, before a byte is written; the common image shape."""
    check_name(name, "--name")
    if shard_rows <= 0:
        raise VaegenError(f"--shard-rows={shard_rows} must be > 0")
    if not dataset.splits:
        raise VaegenError(f"dataset {name!r} has no splits")
    for split, data in dataset.splits.items():
        check_name(split, "--split")
        if len(data.labels) == 0:
            raise VaegenError(f"split {split!r} of {name!r} holds no images")
        if data.images.dtype != np.uint8 or data.images.ndim != 4 or len(data.images) != len(data.labels):
            raise VaegenError(f"split {split!r} of {name!r}: images must be uint8 (N, C, H, W), one label each")
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0:
            raise VaegenError(f"split {split!r} of {name!r} has label {low}: labels must be 0 or more")
        if high >= MAX_CLASSES or len(dataset.label_names) > MAX_CLASSES:
            raise VaegenError(f"split {split!r} of {name!r} has label {high} and {len(dataset.label_names):,} class "
                              f"names: at most {MAX_CLASSES:,} classes")
        if dataset.label_names and high >= len(dataset.label_names):
            raise VaegenError(f"split {split!r} of {name!r} has label {high} but only {len(dataset.label_names)} "
                              "class names")
    shapes = {s.images.shape[1:] for s in dataset.splits.values()}
    if len(shapes) != 1:
        raise VaegenError(f"splits of {name!r} differ in image shape: {sorted(shapes)}")
    return shapes.pop()


def generation_of(dataset: ArrayDataset, shard_rows: int) -> str:
    """The content hash that names a generation: same input, same shards, same keys."""
    h = hashlib.sha256(json.dumps([LAYOUT, shard_rows, list(dataset.label_names), dataset.source,
                                   list(dataset.notes)]).encode())
    for split, data in dataset.splits.items():
        h.update(json.dumps([split, list(data.images.shape)]).encode())
        h.update(np.ascontiguousarray(data.images).data)
        h.update(np.ascontiguousarray(data.labels.astype("<i8")).data)
    return h.hexdigest()[:16]


def ingest(storage: Storage, name: str, dataset: ArrayDataset, shard_rows: int = DEFAULT_SHARD_ROWS,
           progress: bool = True, keep_superseded_s: float = KEEP_SUPERSEDED_S) -> dict:
    """Arrays already in memory (tests, benchmarks) as a dataset: the commit protocol of every ingest
    (begin_generation, shards, commit_generation) with the shards written here. Sources go through
    cluster/data/ingest.py, which streams them."""
    shape = check_dataset(name, dataset, shard_rows)
    generation = generation_of(dataset, shard_rows)
    done = begin_generation(storage, name, generation)
    if done is not None:
        return done
    manifest = new_manifest(name, generation, shape, dataset.label_names, dataset.source, dataset.notes)
    total = sum(len(s.labels) for s in dataset.splits.values())
    with tqdm(total=total, unit="img", desc=f"ingest {name}", disable=not progress) as bar:
        for split, data in dataset.splits.items():
            shards = []
            for index, start in enumerate(range(0, len(data.labels), shard_rows)):
                stop = min(start + shard_rows, len(data.labels))
                shards.append(write_shard(storage, name, split, part_name(index, generation),
                                          data.images[start:stop], data.labels[start:stop], start,
                                          dataset.label_names))
                bar.update(stop - start)
            manifest["splits"][split] = {"rows": len(data.labels), "shards": shards}
    return commit_generation(storage, manifest, keep_superseded_s)


def read_manifest(storage: Storage, name: str) -> dict:
    check_name(name, "dataset name")
    key = dataset_manifest_key(name)
    if not storage.exists(key):
        known = [d for d in storage.list_dirs(DATASETS) if storage.exists(dataset_manifest_key(d))]
        raise VaegenError(f"no dataset {name!r} in {storage.uri} (datasets there: {', '.join(known) or 'none'}; "
                          "run `vaegen ingest` first)")
    return parse_manifest(storage.read_bytes(key), name, key, storage)


def split_shards(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard records of one split; a split the dataset lacks is a one-line error."""
    if split not in manifest["splits"]:
        raise VaegenError(f"dataset {manifest['name']!r} has no split {split!r} "
                          f"(splits: {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def shard_keys(storage: Storage, name: str, split: str, manifest: dict | None = None) -> list[str]:
    """The shard keys of one split. Pass the manifest a job already read, so that all its reads come from one
    generation: reading the manifest again could meet a re-ingest's commit and mix two datasets in one job."""
    manifest = manifest if manifest is not None else read_manifest(storage, name)
    return [dataset_key(name, split, s["name"]) for s in split_shards(manifest, split)]


def read_shard(storage: Storage, name: str, split: str, shard: dict) -> bytes:
    """One shard's bytes (a manifest's shard record), sha256-checked. A shard that is gone because a re-ingest
    replaced the dataset (and its grace period passed) is the one-line 'replaced while reading' error."""
    key = dataset_key(name, split, shard["name"])
    try:
        body = storage.read_bytes(key)
    except VaegenError:
        if storage.exists(key):
            raise
        current = current_manifest(storage, name)
        names = {s["name"] for s in (current or {}).get("splits", {}).get(split, {}).get("shards", [])}
        if shard["name"] not in names:
            raise VaegenError(f"dataset {name!r} was replaced while reading: rerun") from None
        raise VaegenError(f"dataset shard {name}/{split}/{shard['name']} is missing: re-ingest the dataset") from None
    if hashlib.sha256(body).hexdigest() != shard["sha256"]:
        raise VaegenError(f"dataset shard {name}/{split}/{shard['name']} fails its sha256 check (corrupt)")
    return body


def table_arrays(table: pa.Table, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, uint8 images (N, C, H, W)) from a dataset table, without copying pixels twice."""
    pixels = table.column("pixels").combine_chunks()
    flat = np.frombuffer(pixels.buffers()[1], dtype=np.uint8, count=len(pixels) * int(np.prod(image_shape)),
                         offset=pixels.offset * int(np.prod(image_shape)))
    return (table.column("id").to_numpy(), table.column("label").to_numpy(),
            flat.reshape(len(pixels), *image_shape))


def rows_with_ids(table: pa.Table, image_shape: tuple[int, ...], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of a dataset table whose id is in `ids` (sorted, unique): id, label and uint8 image arrays. A Ray Data
    map function for training's reads (cluster/train/on_ray.py). It lives here, where nothing imports torch, because
    every process that runs or plans it imports its module first: a read task's worker, the streaming split's
    coordinator."""
    row_ids, labels, images = table_arrays(table, image_shape)
    keep = np.isin(row_ids, ids, assume_unique=True)
    return {"id": row_ids[keep], "label": labels[keep], "image": images[keep]}


@dataclass
class LoadedSplit:
    ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray             # uint8 (N, C, H, W)
    manifest: dict


def read_split(storage: Storage, name: str, split: str, limit: int = 0, manifest: dict | None = None) -> LoadedSplit:
    """A whole split in memory, from one manifest (`manifest`, else the current one; see shard_keys), each
    shard's sha256 checked against it."""
    manifest = manifest if manifest is not None else read_manifest(storage, name)
    shape = tuple(manifest["image_shape"])
    parts = []
    for shard in split_shards(manifest, split):
        parts.append(table_arrays(pq.read_table(io.BytesIO(read_shard(storage, name, split, shard))), shape))
        if limit and sum(len(p[0]) for p in parts) >= limit:
            break
    ids, labels, images = (np.concatenate(x) for x in zip(*parts))
    if limit:
        ids, labels, images = ids[:limit], labels[:limit], images[:limit]
    return LoadedSplit(ids, labels, images, manifest)


def bind_model_to_dataset(cfg: ModelConfig, manifest: dict, conditional: bool) -> ModelConfig:
    """Fill image shape and class count from the dataset; refuse a config that contradicts it."""
    shape = tuple(manifest["image_shape"])
    if cfg.image_shape is not None and tuple(cfg.image_shape) != shape:
        raise VaegenError(f"dataset {manifest['name']!r} holds images of shape {shape} (C,H,W) but the model "
                          f"config says {tuple(cfg.image_shape)}")
    classes = len(manifest["label_names"]) if conditional else 0
    if conditional and classes == 0:
        raise VaegenError(f"dataset {manifest['name']!r} is unlabelled: --conditional needs labels (train without "
                          "it, or ingest labelled data)")
    if conditional and classes < 2:
        raise VaegenError(f"dataset {manifest['name']!r} has {classes} label(s): nothing to condition on")
    if cfg.num_classes and cfg.num_classes != classes:
        raise VaegenError(f"model config has {cfg.num_classes} classes but dataset {manifest['name']!r} "
                          f"has {len(manifest['label_names'])}")
    return dataclasses.replace(cfg, image_shape=shape, num_classes=classes)
