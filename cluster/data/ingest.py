"""Sources → datasets on storage, streamed on Ray Data: no process ever holds the dataset.

1. plan_source lists the input into small items (cluster/data/sources.py); the generation is named from the
   plan's fingerprint, the layout, --shard-rows and the options, so the same input and flags give the same keys,
   and re-ingesting what is current writes nothing (begin_generation).
2. Read: Ray Data maps runs of items (about RUN_IMAGES images each) over the cluster's CPUs; a task decodes and
   shapes its images (read_item), checks them (one shape, labels below the class count; a bad image is one line,
   or with --skip-bad is counted) and writes them to storage as uncompressed pieces under the ingest's _pending
   folder, returning only a small record. The driver sums the records: it never sees a pixel.
3. Write: the rows are numbered 0..N-1 per split in input order, cut into shards of --shard-rows, and Ray Data
   maps the shards: a task reads its rows from the pieces and writes the shard (generations.write_shard).
4. Commit: one manifest swap (generations.commit_generation); the pieces are deleted whatever happens.
A tiny input (at most IN_PROCESS_MAX_IMAGES images by the plan, and no Ray running here) runs the same two
task functions in this process instead: starting Ray would take longer than the work."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cluster.data.datasets import table_arrays
from cluster.data.generations import (
    DEFAULT_SHARD_ROWS,
    GENERATION_PREFIX,
    KEEP_SUPERSEDED_S,
    LAYOUT,
    PENDING,
    abandon_generation,
    begin_generation,
    commit_generation,
    discard_folder,
    new_manifest,
    part_name,
    write_shard,
)
from cluster.data.readable import PIXELS_AS_IS, split_table
from cluster.data.sources import (
    IngestOptions,
    SourceItem,
    SourcePlan,
    plan_source,
    read_item,
)
from cluster.store.layout import dataset_key
from cluster.store.storage import Storage, open_storage
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.errors import VaegenError
from vae_core.names import check_name, is_valid_name

DEFAULT_NAMES = {"fashion-mnist": "fashion-mnist", "parquet": "parquet"}
RUN_IMAGES = 1024                  # at most, images per read task and per piece: what one worker holds at once
MIN_RUN_IMAGES = 64                # at least (a task costs a few ms to schedule) ...
RUNS_PER_CPU = 4                   # ... else enough runs for every CPU to get several (an even finish)
IN_PROCESS_MAX_IMAGES = 2048
SKIPPED_EXAMPLES = 5               # bad images named in the manifest and the card (--skip-bad)
INGEST_OBJECT_STORE_MB = 256       # only records pass through it


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


def input_name(uri: str) -> str:
    """An input's own name: the last segment of an s3:// URI, else of the local path made absolute (so '.' is the
    current folder's name)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(os.path.abspath(uri).rstrip("/"))


def default_name(source: str, path: str | None) -> str:
    """The dataset name when --name is not given: fashion-mnist or parquet, else the input folder's own name; one
    that is not a valid name asks for --name."""
    if source in DEFAULT_NAMES:
        return DEFAULT_NAMES[source]
    base = input_name(path)
    if not is_valid_name(base):
        raise VaegenError(f"cannot name the dataset after the folder {path!r} ({base!r} is not a valid name): "
                          "pass --name")
    return base


def recorded_source(uri: str) -> str:
    """What the manifest and the card say the dataset came from: an s3:// URI as given, a local input by its own
    name, since a record under the root never names a place on the machine that wrote it (a root is portable)."""
    return uri if uri.startswith("s3://") else input_name(uri) or uri


def source_generation(plan: SourcePlan, shard_rows: int, options: IngestOptions) -> str:
    """The generation an ingest of `plan` writes: same input, flags and layout, same generation."""
    identity = [LAYOUT, shard_rows, plan.kind, plan.fingerprint, dataclasses.asdict(options)]
    return hashlib.sha256(json.dumps(identity, default=list).encode()).hexdigest()[:16]


def ingest_source(source: str, path: str | None, storage_cfg: StorageConfig, *, name: str | None = None,
                  split: str | None = None, shard_rows: int = DEFAULT_SHARD_ROWS, progress: bool = True,
                  keep_superseded_s: float = KEEP_SUPERSEDED_S, options: IngestOptions | None = None) -> dict:
    """Ingest `path` as dataset `name` (see the module docstring); bad input is one line and publishes nothing.
    `split` is the split of input that names none (IngestOptions.split)."""
    options = options or IngestOptions()
    if split is not None:
        options = dataclasses.replace(options, split=split)
    if shard_rows <= 0:
        raise VaegenError(f"--shard-rows={shard_rows} must be > 0")
    check_name(options.split, "--split")
    name = check_name(name, "--name") if name is not None else default_name(source, path)
    plan = plan_source(source, path, storage_cfg, options)
    if plan.label_names is not None and len(plan.label_names) > MAX_CLASSES:
        raise VaegenError(f"{plan.uri} has {len(plan.label_names):,} classes: at most {MAX_CLASSES:,}")
    storage = open_storage(storage_cfg, for_writing=True)
    generation = source_generation(plan, shard_rows, options)
    done = begin_generation(storage, name, generation)
    if done is not None:
        return done
    job = IngestJob(source, name, generation, storage_cfg, options, plan.label_names)
    try:
        with ingest_runtime(plan) as use_ray:
            try:
                pieces = read_pieces(job, plan, use_ray, progress)
                manifest = new_manifest(name, generation, check_pieces(pieces), plan.label_names or (),
                                        recorded_source(plan.uri),
                                        skipped=skipped_record(pieces))
                manifest["splits"] = write_shards(job, pieces, shard_rows, use_ray)
            finally:
                discard_folder(storage, job.pieces_folder())
    except VaegenError:
        abandon_generation(storage, name, generation)        # bad input publishes nothing, not even its marker
        raise
    return commit_generation(storage, manifest, keep_superseded_s)


@contextmanager
def ingest_runtime(plan: SourcePlan) -> Iterator[bool]:
    """Ray (the one running here, else RAY_ADDRESS's, else a local one): True; this process for a tiny input."""
    ray = sys.modules.get("ray")
    estimate = sum(weight(i) for i in plan.items)
    if (ray is None or not ray.is_initialized()) and estimate <= IN_PROCESS_MAX_IMAGES \
            and not os.environ.get("RAY_ADDRESS"):
        yield False
        return
    from cluster.runtime.ray_session import ray_runtime
    with ray_runtime(object_store_mb=int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or INGEST_OBJECT_STORE_MB):
        yield True


# -- tasks: the same functions on Ray Data or in this process ----------------------------------------------
def run_tasks(fn: Callable[[dict, IngestJob], dict], rows: list[dict], job: IngestJob, use_ray: bool) -> Iterator[dict]:
    """fn over rows, one task per row (results in any order); a task's VaegenError is the driver's, one line."""
    if not use_ray:
        yield from (fn(row, job) for row in rows)
        return
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True      # a task's VaegenError, not Ray Data's UserCodeException around it
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(fn, fn_kwargs={"job": job}, num_cpus=1)
    try:
        yield from dataset.iter_rows()
    except Exception as error:                  # noqa: BLE001 - Ray's wrappers of a task's error
        raise task_error(error) from None


def task_error(error: BaseException) -> BaseException:
    """The VaegenError (or OSError) a task raised, out of Ray's wrappers (whose own str is the worker's traceback,
    even where the wrapper is also a VaegenError); else the error itself."""
    chain, seen = [], error
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__
    for inner in reversed(chain):                      # the innermost: what the task itself raised
        if isinstance(inner, VaegenError):                 # one line; Ray Data appends its retry advice
            return VaegenError(str(inner).splitlines()[0] if str(inner) else "")
        if isinstance(inner, OSError):
            return inner
    return error


def read_run(row: dict, job: IngestJob) -> dict:
    """One run of items: decode, check, write pieces of at most RUN_IMAGES images; its record (as JSON)."""
    storage, pieces, bad = Storage(job.storage), [], []
    images, labels, first = [], [], None

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

    for fields in json.loads(row["items"]):
        for image in read_item(job.kind, SourceItem(*fields), job.storage, job.options):
            if image.pixels is None:
                bad.append({"name": image.name, "error": image.error})
                continue
            if first is None:
                first = (image.name, list(image.pixels.shape))
            elif list(image.pixels.shape) != first[1]:
                raise VaegenError(mixed_shapes(first, (image.name, list(image.pixels.shape))))
            check_label(image.name, image.label, job.label_names)
            images.append(image.pixels)
            labels.append(image.label if job.label_names is not None else -1)
            if len(images) >= RUN_IMAGES:
                flush()
    if images:
        flush()
    return {"record": json.dumps({"run": row["run"], "split": row["split"], "pieces": pieces, "first": first,
                                  "bad": len(bad), "examples": bad[:SKIPPED_EXAMPLES]})}


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


def write_shard_task(row: dict, job: IngestJob) -> dict:
    """One shard from the pieces' rows it covers; its manifest record (as JSON)."""
    storage = Storage(job.storage)
    spec = json.loads(row["spec"])
    shape = tuple(spec["shape"])
    parts = []
    for key, start, stop in spec["pieces"]:
        _, labels, images = table_arrays(pq.read_table(storage.path(key), filesystem=storage.fs), shape)
        parts.append((images[start:stop], labels[start:stop]))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    record = write_shard(storage, job.name, spec["split"], part_name(spec["index"], job.generation), images, labels,
                         spec["first_id"], job.label_names or ())
    return {"record": json.dumps({"split": spec["split"], "index": spec["index"], "shard": record})}


# -- the driver: runs of items → records → shard specs → shard records --------------------------------------
def read_pieces(job: IngestJob, plan: SourcePlan, use_ray: bool, progress: bool) -> list[dict]:
    """Stage 1: the runs' records, in input order."""
    total = sum(weight(i) for i in plan.items)
    run_images = max(MIN_RUN_IMAGES, min(RUN_IMAGES, total // (RUNS_PER_CPU * cluster_cpus(use_ray)) + 1))
    rows, run, in_run = [], [], 0
    for item in plan.items:
        if run and (item.split != run[0].split or in_run >= run_images):
            rows.append(run_row(len(rows), run))
            run, in_run = [], 0
        run.append(item)
        in_run += weight(item)
    if run:
        rows.append(run_row(len(rows), run))
    records = []
    with tqdm(total=total, unit="img", desc=f"ingest {job.name}", disable=not progress, delay=1) as bar:
        for result in run_tasks(read_run, rows, job, use_ray):
            record = json.loads(result["record"])
            records.append(record)
            bar.update(sum(p["rows"] for p in record["pieces"]) + record["bad"])
    return sorted(records, key=lambda r: r["run"])


def cluster_cpus(use_ray: bool) -> int:
    if not use_ray:
        return 1
    import ray
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def weight(item: SourceItem) -> int:
    return item.stop - item.start if item.stop >= 0 else 1


def run_row(index: int, items: list[SourceItem]) -> dict:
    return {"run": index, "split": items[0].split, "items": json.dumps([dataclasses.astuple(i) for i in items])}


def check_pieces(records: list[dict]) -> list[int]:
    """The one image shape of every run (runs checked their own); a split with no image is one line."""
    firsts = [r["first"] for r in records if r["first"] is not None]
    if not firsts:
        raise VaegenError("the input holds no readable image" + (" (every one was skipped as bad)"
                                                                 if any(r["bad"] for r in records) else ""))
    for other in firsts[1:]:
        if other[1] != firsts[0][1]:
            raise VaegenError(mixed_shapes(firsts[0], other))
    return firsts[0][1]


def skipped_record(records: list[dict]) -> dict:
    examples = [e for r in records for e in r["examples"]][:SKIPPED_EXAMPLES]
    return {"count": sum(r["bad"] for r in records), "examples": examples}


def write_shards(job: IngestJob, records: list[dict], shard_rows: int, use_ray: bool) -> dict:
    """Stage 2: each split's rows numbered 0..N-1 in input order, cut into shards; the manifest's splits."""
    shape = check_pieces(records)
    specs, rows_of = [], {}
    for split in dict.fromkeys(r["split"] for r in records):
        pieces = [(p["key"], p["rows"]) for r in records if r["split"] == split for p in r["pieces"]]
        rows_of[split] = total = sum(n for _, n in pieces)
        if total == 0:
            raise VaegenError(f"split {split!r} of {job.name!r} holds no images")
        check_name(split, "split name")
        specs += shard_specs(split, pieces, shard_rows, shape)
    done = [json.loads(r["record"]) for r in run_tasks(write_shard_task, specs, job, use_ray)]
    return {split: {"rows": rows_of[split],
                    "shards": [d["shard"] for d in sorted(done, key=lambda d: d["index"]) if d["split"] == split]}
            for split in rows_of}


def shard_specs(split: str, pieces: list[tuple[str, int]], shard_rows: int, shape: list[int]) -> list[dict]:
    """Shard k holds rows [k·shard_rows, (k+1)·shard_rows) of the split: which slices of which pieces."""
    specs, at, offset = [], 0, 0
    bounds = []                                        # (piece key, its first row, its row count)
    for key, n in pieces:
        bounds.append((key, offset, n))
        offset += n
    for index, first in enumerate(range(0, offset, shard_rows)):
        last = min(first + shard_rows, offset)
        slices = []
        while at < len(bounds) and bounds[at][1] < last:
            key, start, n = bounds[at]
            lo, hi = max(first, start) - start, min(last, start + n) - start
            if hi > lo:
                slices.append((key, lo, hi))
            if start + n <= last:
                at += 1
            else:
                break
        specs.append({"spec": json.dumps({"split": split, "index": index, "first_id": first, "shape": shape,
                                          "pieces": slices})})
    return specs
