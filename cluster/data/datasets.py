"""Datasets on storage as Parquet shards plus one manifest, replaced atomically by a re-ingest.

Layout (root-relative keys):
    datasets/<name>/_manifest.json                               the commit: names the current generation
    datasets/<name>/<split>/g-<generation>/part-00000.parquet    one generation's shards, never rewritten
    datasets/<name>/_pending/g-<generation>.json                 an ingest in progress (when it started)
Rows: id (int64), label (int64), pixels (fixed-size binary, C·H·W uint8 in CHW order).

The generation is a hash of everything an ingest writes (layout, shard size, label names, source, every split's
pixels and labels), so identical input gives identical keys and bytes, and re-ingesting what is already current
writes nothing at all. A manifest shard record's "name" carries its generation folder ("g-<id>/part-00000.parquet"),
so every reader builds a shard's key as `dataset_key(name, split, shard["name"])`. A manifest of another layout
(an older vaegen's) is refused in one line that says to re-ingest; the re-ingest replaces it.

Replacing a dataset: an ingest writes its shards under a new generation folder, invisible to readers, then
commits by swapping `_manifest.json` in one write (Storage.compare_and_swap: one PUT, or one rename). A reader reads
the manifest once and then only the shards it names, so it sees the old dataset or the new one, never a mix; a
failed or killed ingest leaves the old manifest, and with it the old dataset, untouched.

Garbage collection, run by each ingest after its commit: a generation is deleted only when
  - the manifest does not name it as current, and
  - it is not listed under the manifest's "superseded" entries, which keep each replaced generation for
    KEEP_SUPERSEDED_S (24 h) after the commit that replaced it, and
  - no ingest of it is in progress (a `_pending` marker younger than PENDING_TIMEOUT_S, 24 h).
A time bound, not "keep the last K": a reader holds a manifest for as long as its job runs, however many
re-ingests happen meanwhile, so how long old data stays is what protects it; a count would let two quick
re-ingests pull shards from under a trainer. A reader that outlives the grace period finds its shards gone and
stops with one line, "dataset X was replaced while reading: rerun" (read_shard). A job reads the manifest once and
passes it to read_split / shard_keys, so that all its reads come from one generation. Leftovers of a killed ingest
(no manifest names them) are removed once its marker is older than PENDING_TIMEOUT_S; an ingest must finish within
that time. Two ingests of one dataset name at once are safe: the last commit wins, and the compare-and-swap keeps
every replaced generation on the superseded list."""
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
from vae_core.progress import Progress as tqdm      # plain lines when not on a terminal

from cluster.store.layout import DATASETS, dataset_key, dataset_manifest_key
from cluster.store.records import OtherFormat, as_object, fields, parse_record
from cluster.store.storage import Storage
from vae_core.config import MAX_CLASSES, ModelConfig
from vae_core.data import ArrayDataset
from vae_core.errors import VaegenError
from vae_core.names import check_name

PENDING = "_pending"
GENERATION_PREFIX = "g-"
LAYOUT = "vaegen-dataset-2"             # part of every generation hash: a layout change never reuses old keys
DEFAULT_SHARD_ROWS = 10_000
KEEP_SUPERSEDED_S = 24 * 3600.0
PENDING_TIMEOUT_S = 24 * 3600.0
COMMIT_ATTEMPTS = 20


def part_name(index: int, generation: str | None = None) -> str:
    """A shard's name in the manifest, relative to its split folder (with the generation folder, if any)."""
    part = f"part-{index:05d}.parquet"
    return f"{GENERATION_PREFIX}{generation}/{part}" if generation else part


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
    """Write every split as a new generation of shards, then commit it with one manifest write (see the module
    docstring). Re-ingesting the current content writes nothing; a failure before the commit changes nothing
    readers see."""
    shape = check_dataset(name, dataset, shard_rows)
    if not storage.is_s3:
        # One walk of the dataset's folder first: a link planted in it stops the ingest before it writes, not at
        # the garbage collection after its commit (Storage refuses every link it meets; S3 has none).
        storage.list(dataset_key(name), recursive=True)
    generation = generation_of(dataset, shard_rows)
    current = current_manifest(storage, name)
    if current and current.get("generation") == generation and generation_complete(storage, current):
        return current
    pending_key = dataset_key(name, PENDING, f"{GENERATION_PREFIX}{generation}.json")
    storage.publish(pending_key, json.dumps({"generation": generation, "started_at": time.time()}).encode())
    manifest = {"name": name, "layout": LAYOUT, "generation": generation, "image_shape": list(shape),
                "label_names": list(dataset.label_names), "source": dataset.source, "notes": list(dataset.notes),
                "created_at": time.time(), "splits": {}}
    total = sum(len(s.labels) for s in dataset.splits.values())
    with tqdm(total=total, unit="img", desc=f"ingest {name}", disable=not progress) as bar:
        for split, data in dataset.splits.items():
            shards = []
            for index, start in enumerate(range(0, len(data.labels), shard_rows)):
                stop = min(start + shard_rows, len(data.labels))
                body = table_bytes(split_table(data.images[start:stop], data.labels[start:stop], start))
                record = {"name": part_name(index, generation), "rows": stop - start, "first_id": start,
                          "last_id": stop - 1, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                publish_shard(storage, dataset_key(name, split, record["name"]), body, record["sha256"])
                shards.append(record)
                bar.update(stop - start)
            manifest["splits"][split] = {"rows": len(data.labels), "shards": shards}
    manifest = swap_manifest(storage, manifest, keep_superseded_s)
    storage.delete(pending_key)
    collect_garbage(storage, name, keep_superseded_s=keep_superseded_s)
    return manifest


def publish_shard(storage: Storage, key: str, body: bytes, sha256: str) -> None:
    """Create the shard; one already there (a killed ingest of the same content) is kept if its bytes match."""
    if not storage.publish(key, body, if_absent=True):
        if hashlib.sha256(storage.read_bytes(key)).hexdigest() != sha256:
            storage.publish(key, body)


def swap_manifest(storage: Storage, manifest: dict, keep_superseded_s: float) -> dict:
    """Swap the manifest in one write, moving the generation it replaces onto the superseded list; a concurrent
    commit in between makes us read again and redo the list, so no replaced generation is ever forgotten."""
    key = dataset_manifest_key(manifest["name"])
    for _ in range(COMMIT_ATTEMPTS):
        seen = storage.read_bytes(key) if storage.exists(key) else None
        try:
            previous = parse_manifest(seen, manifest["name"], key, storage) if seen is not None else None
        except VaegenError:
            previous = None                         # a corrupt manifest: this commit is its repair
        if previous is not None and previous.get("generation") == manifest["generation"]:
            return previous                         # a concurrent ingest of the same content committed it
        now = time.time()
        manifest["superseded"] = [e for e in (previous or {}).get("superseded", [])
                                  if now - e["superseded_at"] < keep_superseded_s
                                  and e["generation"] != manifest["generation"]]
        if previous is not None and keep_superseded_s > 0:
            manifest["superseded"].append({"generation": previous.get("generation"), "superseded_at": now})
        body = json.dumps(manifest, indent=2).encode()
        if storage.compare_and_swap(key, body, lambda current: current == seen):
            return manifest
    raise VaegenError(f"dataset {manifest['name']!r} kept changing under this ingest ({COMMIT_ATTEMPTS} commits "
                      "lost to other ingests of the same name): rerun it")


def current_manifest(storage: Storage, name: str) -> dict | None:
    """The committed manifest, or None where there is none or it is unreadable (an ingest replaces it)."""
    key = dataset_manifest_key(name)
    if not storage.exists(key):
        return None
    try:
        return parse_manifest(storage.read_bytes(key), name, key, storage)
    except VaegenError:
        return None


def generation_complete(storage: Storage, manifest: dict) -> bool:
    """Every shard the manifest names is there with its size (a listing per split, no reads)."""
    name = manifest["name"]
    for split, info in manifest["splits"].items():
        folder = dataset_key(name, split)
        sizes = {e.key[len(folder) + 1:]: e.size for e in storage.list(folder, recursive=True)}
        if any(sizes.get(s["name"]) != s["bytes"] for s in info["shards"]):
            return False
    return True


# -- garbage collection --------------------------------------------------------------------------------
def collect_garbage(storage: Storage, name: str, *, now: float | None = None,
                    keep_superseded_s: float = KEEP_SUPERSEDED_S,
                    pending_timeout_s: float = PENDING_TIMEOUT_S) -> list[str]:
    """Delete the generations nothing may still read (the rule is in the module docstring); the keys deleted.

    The files are listed before anything says what is in use: an ingest publishes its marker before its first
    shard and deletes it only after its commit, so every generation whose files the listing saw is, when the
    markers and then the manifest are read, either pending or named by the manifest (current or superseded)."""
    now = time.time() if now is None else now
    candidates = []
    for split in storage.list_dirs(dataset_key(name)):
        if not split.startswith(("_", ".")):
            folder = dataset_key(name, split)
            candidates += [(folder, e.key) for e in storage.list(folder, recursive=True)]
    keep = generations_in_use(storage, name, now, keep_superseded_s, pending_timeout_s)
    if keep is None:
        return []                                   # nothing tells us what is in use: delete nothing
    deleted = []
    for folder, key in candidates:
        generation = generation_of_key(key[len(folder) + 1:])
        if generation != "" and generation not in keep:
            storage.delete(key)
            deleted.append(key)
    for folder in sorted({folder for folder, _ in candidates}):
        remove_empty_folders(storage, folder)
    return deleted


def generations_in_use(storage: Storage, name: str, now: float, keep_superseded_s: float,
                       pending_timeout_s: float) -> set | None:
    """Pending generations (markers read first), then the manifest's current and superseded ones; None when
    there is no readable manifest. A marker older than pending_timeout_s is a killed ingest's: deleted."""
    keep = set()
    for entry in storage.list(dataset_key(name, PENDING)):
        try:
            marker = json.loads(storage.read_bytes(entry.key))
            started, generation = float(marker["started_at"]), str(marker["generation"])
        except (VaegenError, ValueError, KeyError, TypeError):
            started, generation = float("-inf"), None
        if now - started < pending_timeout_s:
            keep.add(generation)
        else:
            storage.delete(entry.key)
    manifest = current_manifest(storage, name)
    if manifest is None:
        return None
    return keep | {manifest.get("generation")} | {e["generation"] for e in manifest.get("superseded", [])
                                                  if now - e["superseded_at"] < keep_superseded_s}


def generation_of_key(path: str) -> str:
    """The generation a file under a split folder belongs to: 'g-<id>/…' → id; anything else (a loose temp file,
    a stranger's file) → '' (left alone)."""
    head, _, rest = path.partition("/")
    if rest and head.startswith(GENERATION_PREFIX):
        return head[len(GENERATION_PREFIX):]
    return ""


def remove_empty_folders(storage: Storage, folder: str) -> None:
    """Local roots keep empty folders after their files go (S3 has no folders)."""
    if storage.is_s3:
        return
    import os
    for d in storage.list_dirs(folder):
        try:
            os.rmdir(storage.path(f"{folder}/{d}"))
        except OSError:
            pass                                    # not empty, or gone already


# -- reading -------------------------------------------------------------------------------------------
def reingest_fix(name: str) -> str:
    return f"re-ingest the dataset (`vaegen ingest ... --name {name}`)"


def _manifest_fields(manifest) -> dict:
    """The fields every reader uses, of the types vaegen writes (one check, where the manifest is parsed)."""
    if as_object(manifest).get("layout") != LAYOUT:
        raise OtherFormat(f"layout {manifest.get('layout')!r}, not {LAYOUT!r}")
    fields(manifest, {"image_shape": "ints", "label_names": "strs", "splits": dict})
    for split in manifest["splits"].values():
        fields(split, {"rows": "count", "shards": list})
        for shard in split["shards"]:
            fields(shard, {"name": str, "sha256": str})
    return manifest


def parse_manifest(body: bytes, name: str, key: str, storage: Storage) -> dict:
    return parse_record(body, storage.uri_of(key), reingest_fix(name), _manifest_fields)


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
    if conditional and classes < 2:
        raise VaegenError(f"dataset {manifest['name']!r} has {classes} label(s): nothing to condition on")
    if cfg.num_classes and cfg.num_classes != classes:
        raise VaegenError(f"model config has {cfg.num_classes} classes but dataset {manifest['name']!r} "
                          f"has {len(manifest['label_names'])}")
    return dataclasses.replace(cfg, image_shape=shape, num_classes=classes)
