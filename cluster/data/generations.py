"""Datasets on storage as Parquet shards plus one manifest, replaced atomically by a re-ingest; the folder itself
readable by pandas and Hugging Face `datasets`.

Layout (root-relative keys):
    datasets/<name>/_manifest.json                                 the commit: names the current generation
    datasets/<name>/<split>/__g-<generation>/part-00000.parquet    one generation's shards, never rewritten
    datasets/<name>/<split>/part-00000-of-00003.parquet            the readable view: the current generation's
                                                                   shards (hard links; copies on S3)
    datasets/<name>/README.md, _view.json                          the card; which generation the view shows
    datasets/<name>/_pending/g-<generation>.json                   an ingest in progress (when it started)
    datasets/<name>/_pending/__g-<generation>/<split>/run-*.parquet   a two-pass ingest's decoded images before
                                                                      they are shards (cluster/data/ingest.py)
Rows: id (int64, 0..N-1 per split in input order), label (int64; -1 in an unlabelled dataset, whose manifest has
no class names), pixels (fixed-size binary, C·H·W uint8 in CHW order).

Why a view rather than moving files: a reader that holds a manifest (a training job) reads the paths it names for
as long as it runs, so a generation's files never move; pyarrow skips folders starting with `_` and `datasets`
those starting with `__`, so `__g-<id>/` is invisible to both, and the view is what they read. The view and the
card (cluster/data/readable.py) follow the commit: a killed ingest leaves the old view, as it leaves the old
manifest; a reader of the raw folder during a view update may see both generations' files for that moment.

The generation is a hash of what determines an ingest's bytes: for a source, its plan's fingerprint (every
input file's name, size and time), the options, --shard-rows and the layout (cluster/data/ingest.py); for arrays
in memory, their content. The same input gives the same keys and bytes, and re-ingesting what is already current
writes nothing at all. A manifest shard record's "name" carries its generation folder ("__g-<id>/part-00000.parquet"),
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
(no manifest names them), its runs under _pending included, are removed once its marker is older than
PENDING_TIMEOUT_S; an ingest must finish within that time (one that ends, failed or not, deletes its own runs). Two ingests of one dataset name at once are safe: the last commit wins, and the compare-and-swap keeps
every replaced generation on the superseded list."""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from cluster.data.readable import KEEP_SUPERSEDED_S, publish_view, shard_bytes
from cluster.store.layout import DATASETS, dataset_key, dataset_manifest_key
from cluster.store.records import OtherFormat, as_object, fields, parse_record
from cluster.store.storage import Storage
from vae_core.errors import VaegenError

PENDING = "_pending"
GENERATION_PREFIX = "__g-"          # `_` hides it from pyarrow, `__` from Hugging Face datasets
LAYOUT = "vaegen-dataset-3"             # part of every generation hash: a layout change never reuses old keys
DEFAULT_SHARD_ROWS = 10_000
PENDING_TIMEOUT_S = 24 * 3600.0
COMMIT_ATTEMPTS = 20


def part_name(index: int, generation: str | None = None) -> str:
    """A shard's name in the manifest, relative to its split folder (with the generation folder, if any)."""
    part = f"part-{index:05d}.parquet"
    return f"{GENERATION_PREFIX}{generation}/{part}" if generation else part


def new_manifest(name: str, generation: str, shape, label_names, source: str, notes=(), **extra) -> dict:
    return {"name": name, "layout": LAYOUT, "generation": generation, "image_shape": list(shape),
            "label_names": list(label_names), "source": source, "notes": list(notes), "created_at": time.time(),
            **extra, "splits": {}}


def begin_generation(storage: Storage, name: str, generation: str) -> dict | None:
    """Before an ingest's first write: the current manifest when `generation` is already current and whole
    (nothing to write: its view is refreshed); else None, once the ingest's pending marker is published."""
    if not storage.is_s3:
        # One walk of the dataset's folder first: a link planted in it stops the ingest before it writes, not at
        # the garbage collection after its commit (Storage refuses every link it meets; S3 has none).
        storage.list(dataset_key(name), recursive=True)
    current = current_manifest(storage, name)
    if current and current.get("generation") == generation and generation_complete(storage, current):
        publish_view(storage, current)
        return current
    storage.publish(pending_key(name, generation), json.dumps({"generation": generation,
                                                               "started_at": time.time()}).encode())
    return None


def pending_key(name: str, generation: str) -> str:
    return dataset_key(name, PENDING, f"g-{generation}.json")


def write_shard(storage: Storage, name: str, split: str, shard_name: str, images: np.ndarray, labels: np.ndarray,
                first_id: int, label_names) -> dict:
    """One shard of a generation from arrays in memory, published; its manifest record."""
    return publish_encoded_shard(storage, name, split, shard_name, shard_bytes(images, labels, first_id, label_names),
                                 len(labels), first_id)


def publish_encoded_shard(storage: Storage, name: str, split: str, shard_name: str, body: bytes, rows: int,
                          first_id: int) -> dict:
    """One shard of a generation, encoded (readable.ShardWriter), published; its manifest record."""
    record = {"name": shard_name, "rows": rows, "first_id": first_id, "last_id": first_id + rows - 1,
              "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    publish_shard(storage, dataset_key(name, split, shard_name), body, record["sha256"])
    return record


def discard_folder(storage: Storage, folder: str) -> None:
    """Delete every file under `folder`, then (locally) the folders left empty."""
    for entry in storage.list(folder, recursive=True):
        storage.delete(entry.key)
    if not storage.is_s3:
        for path, _, _ in sorted(os.walk(storage.path(folder)), key=lambda w: -len(w[0])):
            try:
                os.rmdir(path)
            except OSError:
                pass                                # not empty: something else lives there


def abandon_generation(storage: Storage, name: str, generation: str) -> None:
    """An ingest that refused its input: its marker goes, and what it wrote of its generation (nothing names it),
    with the folders it made when it was the dataset's first."""
    storage.delete(pending_key(name, generation))
    for split in storage.list_dirs(dataset_key(name)):
        discard_folder(storage, dataset_key(name, split, f"{GENERATION_PREFIX}{generation}"))
    if not storage.is_s3:
        for folder in (dataset_key(name, PENDING), dataset_key(name), DATASETS):
            remove_empty_folders(storage, folder)
            try:
                os.rmdir(storage.path(folder))
            except OSError:
                pass                                # not empty: something else lives there


def commit_generation(storage: Storage, manifest: dict, keep_superseded_s: float = KEEP_SUPERSEDED_S) -> dict:
    """The commit (one manifest swap), then what follows it: the marker goes, the readable view and card show
    the current generation, garbage is collected."""
    committed = swap_manifest(storage, manifest, keep_superseded_s)
    storage.delete(pending_key(manifest["name"], manifest["generation"]))
    publish_view(storage, current_manifest(storage, manifest["name"]) or committed)
    collect_garbage(storage, manifest["name"], keep_superseded_s=keep_superseded_s)
    return committed


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
        if not split.startswith(("_", ".")) or split == PENDING:
            folder = dataset_key(name, split)
            candidates += [(folder, e.key) for e in storage.list(folder, recursive=True)]
    in_use = generations_in_use(storage, name, now, keep_superseded_s, pending_timeout_s)
    if in_use is None:
        return []                                   # nothing tells us what is in use: delete nothing
    pending, keep = in_use
    deleted = []
    for folder, key in candidates:
        generation = generation_of_key(key[len(folder) + 1:])
        # An ingest's runs (under _pending) serve only while it is pending; shards while anything may read them.
        if generation != "" and generation not in (pending if folder.endswith(PENDING) else keep):
            storage.delete(key)
            deleted.append(key)
    for folder in sorted({folder for folder, _ in candidates}):
        remove_empty_folders(storage, folder)
    return deleted


def generations_in_use(storage: Storage, name: str, now: float, keep_superseded_s: float,
                       pending_timeout_s: float) -> tuple[set, set] | None:
    """(pending generations, those and the manifest's current and superseded ones): the markers are read first;
    None when there is no readable manifest. A marker older than pending_timeout_s is a killed ingest's: deleted."""
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
    return keep, keep | {manifest.get("generation")} | {e["generation"] for e in manifest.get("superseded", [])
                                                        if now - e["superseded_at"] < keep_superseded_s}


def generation_of_key(path: str) -> str:
    """The generation a file under a split (or _pending) folder belongs to: '__g-<id>/…' → id; anything else (a loose temp file,
    a stranger's file) → '' (left alone)."""
    head, _, rest = path.partition("/")
    if rest and head.startswith(GENERATION_PREFIX):
        return head[len(GENERATION_PREFIX):]
    return ""


def remove_empty_folders(storage: Storage, folder: str) -> None:
    """Local roots keep empty folders after their files go (S3 has no folders)."""
    if storage.is_s3:
        return
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
