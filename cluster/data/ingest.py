"""Sources → datasets on storage, streamed on Ray Data: no process ever holds the dataset.

1. plan_source lists the input into small items (cluster/data/sources.py); the generation is named from the
   plan's fingerprint, the layout, --shard-rows and the options, so the same input and flags give the same keys,
   and re-ingesting what is current writes nothing (begin_generation).
2. Where the plan counts every item's images (image folders, IDX, Parquet row ranges), none may be skipped
   (no --skip-bad) and there are at least as many shards as CPUs, one pass: the rows are numbered 0..N-1 per
   split from the plan, cut into shards of --shard-rows, and Ray Data maps the shards: a task decodes and shapes
   its images (read_item), checks them (one shape, labels below the class count; a bad image is one line) and
   writes the final shard.
3. Else two passes (which keep every CPU busy however few the shards): Ray Data maps runs of items (about
   RUN_IMAGES images each) that decode and check their images into uncompressed pieces under the ingest's
   _pending folder (a bad image, with --skip-bad, is counted); the rows are numbered from the runs' counts, and
   Ray Data maps the shards, each read from the pieces it covers.
4. Commit: one manifest swap (generations.commit_generation); the pieces are deleted whatever happens.
The tasks (cluster/data/shard_tasks.py) return only small records: the driver never sees a pixel. An input that
costs little by the plan's estimate (IN_PROCESS_MAX_IMAGES decoded-image equivalents; a raw-pixel row costs a
copy, a fraction of a decode) runs the same task functions in this process instead: starting Ray, or a Ray Data
execution, would take longer than the work. An input to decode still goes to a Ray already running here."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from cluster.data.generations import (
    DEFAULT_SHARD_ROWS,
    KEEP_SUPERSEDED_S,
    LAYOUT,
    abandon_generation,
    begin_generation,
    commit_generation,
    discard_folder,
    new_manifest,
)
from cluster.data.shard_tasks import (
    RUN_IMAGES,
    SKIPPED_EXAMPLES,
    IngestJob,
    mixed_shapes,
    read_run,
    shard_task,
    write_shard_task,
)
from cluster.data.sources import IngestOptions, SourceItem, SourcePlan, plan_source
from cluster.store.storage import Storage, open_storage
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.errors import VaegenError
from vae_core.names import check_name, is_valid_name

DEFAULT_NAMES = {"fashion-mnist": "fashion-mnist", "parquet": "parquet"}
MIN_RUN_IMAGES = 64                # at least, images per two-pass run (a task costs a few ms to schedule) ...
RUNS_PER_CPU = 4                   # ... else enough runs for every CPU to get several (an even finish)
IN_PROCESS_MAX_IMAGES = 2048       # the most work, in decoded images, that this process does rather than Ray
RAW_ROW_COST = 0.02                # a raw-pixel row (IDX, a Parquet `pixels` column) against a decoded image ...
RAW_RESHAPED_COST = 0.15           # ... and one that --size or --mode resizes or converts
INGEST_OBJECT_STORE_MB = 256       # only records pass through it


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
        with ingest_runtime(plan, options) as use_ray:
            if one_pass(plan, options, shard_rows, use_ray):
                manifest = write_in_one_pass(job, plan, shard_rows, use_ray, progress)
            else:
                manifest = write_in_two_passes(storage, job, plan, shard_rows, use_ray, progress)
    except VaegenError:
        abandon_generation(storage, name, generation)        # bad input publishes nothing, not even its marker
        raise
    return commit_generation(storage, manifest, keep_superseded_s)


def one_pass(plan: SourcePlan, options: IngestOptions, shard_rows: int, use_ray: bool) -> bool:
    """Whether the plan knows every split's row count (every item counts its images, none may be dropped) and
    has a shard for every CPU: a shard is one task, so fewer would leave CPUs idle where two passes' runs do not."""
    if options.skip_bad or any(item.stop < 0 for item in plan.items):
        return False
    rows = Counter()
    for item in plan.items:
        rows[item.split] += item.stop - item.start
    return sum(-(-n // shard_rows) for n in rows.values()) >= cluster_cpus(use_ray)


@contextmanager
def ingest_runtime(plan: SourcePlan, options: IngestOptions) -> Iterator[bool]:
    """Ray (the one running here, else RAY_ADDRESS's, else a local one): True. This process (False) for an input
    that costs little (estimated_cost) and either holds only raw pixels or finds no Ray to use."""
    ray = sys.modules.get("ray")
    ray_here = (ray is not None and ray.is_initialized()) or bool(os.environ.get("RAY_ADDRESS"))
    if estimated_cost(plan, options) <= IN_PROCESS_MAX_IMAGES and \
            (not ray_here or all(item.raw for item in plan.items)):
        yield False
        return
    from cluster.runtime.ray_session import ray_runtime
    with ray_runtime(object_store_mb=int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or INGEST_OBJECT_STORE_MB):
        yield True


def estimated_cost(plan: SourcePlan, options: IngestOptions) -> float:
    """The plan's work in decoded images: an encoded image is one, a raw-pixel row a copy (RAW_ROW_COST), or a
    resize or conversion where --size or --mode asks for one."""
    raw = RAW_RESHAPED_COST if options.size is not None or options.mode is not None else RAW_ROW_COST
    return sum(weight(item) * (raw if item.raw else 1.0) for item in plan.items)


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
    # Ray Data reserves part of the CPUs for each operator; with one map it then starts its tasks about a second
    # apart, leaving CPUs idle: a two-task ingest on 2 CPUs took a second longer. There is no other operator here.
    ctx.op_resource_reservation_enabled = False
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


# -- one pass: the plan's rows → shard specs → shard records ---------------------------------------------
def write_in_one_pass(job: IngestJob, plan: SourcePlan, shard_rows: int, use_ray: bool, progress: bool) -> dict:
    """Each split's rows numbered 0..N-1 in plan order and cut into shards, each a task; the manifest."""
    specs, rows_of = [], {}
    for split in dict.fromkeys(item.split for item in plan.items):
        check_name(split, "split name")
        rows_of[split], split_specs = planned_shards(split, [i for i in plan.items if i.split == split], shard_rows)
        if rows_of[split] == 0:
            raise VaegenError(f"split {split!r} of {job.name!r} holds no images")
        specs += split_specs
    records = []
    with tqdm(total=sum(rows_of.values()), unit="img", desc=f"ingest {job.name}", disable=not progress,
              delay=1) as bar:
        for result in run_tasks(shard_task, specs, job, use_ray):
            records.append(json.loads(result["record"]))
            bar.update(records[-1]["shard"]["rows"])
    manifest = records_manifest(job, plan, records)
    manifest["splits"] = splits_record(rows_of, records)
    return manifest


def planned_shards(split: str, items: list[SourceItem], shard_rows: int) -> tuple[int, list[dict]]:
    """(the split's row count, its shards' specs): shard k holds rows [k·shard_rows, (k+1)·shard_rows), as the
    items, or the parts of items (row ranges), that the plan counts there."""
    specs, parts, filled, first = [], [], 0, 0

    def cut():
        specs.append({"spec": json.dumps({"split": split, "index": len(specs), "first_id": first, "rows": filled,
                                          "items": parts})})

    for item in items:
        at = item.start
        while at < item.stop:
            take = min(item.stop - at, shard_rows - filled)
            whole = at == item.start and take == item.stop - item.start
            parts.append(item if whole else item._replace(start=at, stop=at + take))
            at, filled = at + take, filled + take
            if filled == shard_rows:
                cut()
                parts, first, filled = [], first + filled, 0
    if filled:
        cut()
    return first + filled, specs


# -- two passes: runs of items → pieces → shard specs → shard records ------------------------------------------
def write_in_two_passes(storage: Storage, job: IngestJob, plan: SourcePlan, shard_rows: int, use_ray: bool,
                        progress: bool) -> dict:
    try:
        pieces = read_pieces(job, plan, use_ray, progress)
        manifest = records_manifest(job, plan, pieces)
        manifest["splits"] = write_shards(job, pieces, shard_rows, manifest["image_shape"], use_ray)
    finally:
        discard_folder(storage, job.pieces_folder())
    return manifest


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
    """An item's images: counted by the plan, else (a tar, an Arrow file, whose count is unknown) 1."""
    return item.stop - item.start if item.stop >= 0 else 1


def run_row(index: int, items: list[SourceItem]) -> dict:
    return {"run": index, "split": items[0].split, "items": json.dumps(items)}


def write_shards(job: IngestJob, records: list[dict], shard_rows: int, shape: list[int], use_ray: bool) -> dict:
    """Stage 2: each split's rows numbered 0..N-1 in input order, cut into shards; the manifest's splits."""
    specs, rows_of = [], {}
    for split in dict.fromkeys(r["split"] for r in records):
        pieces = [(p["key"], p["rows"]) for r in records if r["split"] == split for p in r["pieces"]]
        rows_of[split] = total = sum(n for _, n in pieces)
        if total == 0:
            raise VaegenError(f"split {split!r} of {job.name!r} holds no images")
        check_name(split, "split name")
        specs += shard_specs(split, pieces, shard_rows, shape)
    return splits_record(rows_of, [json.loads(r["record"]) for r in run_tasks(write_shard_task, specs, job, use_ray)])


# -- what both leave: the tasks' records → the manifest ------------------------------------------------------
def records_manifest(job: IngestJob, plan: SourcePlan, records: list[dict]) -> dict:
    """The manifest (splits to come) from the tasks' records: their one image shape, skipped images, notes."""
    examples = [e for r in records for e in r["examples"]][:SKIPPED_EXAMPLES]
    notes = Counter()
    for record in records:
        notes.update(record["notes"])
    return new_manifest(job.name, job.generation, image_shape(records), plan.label_names or (),
                        recorded_source(plan.uri), [f"{n:,} {note}" for note, n in sorted(notes.items())],
                        skipped={"count": sum(r["bad"] for r in records), "examples": examples})


def image_shape(records: list[dict]) -> list[int]:
    """The one image shape of every task (each checked its own); an input with no image is one line."""
    firsts = [r["first"] for r in records if r["first"] is not None]
    if not firsts:
        raise VaegenError("the input holds no readable image" + (" (every one was skipped as bad)"
                                                                 if any(r["bad"] for r in records) else ""))
    for other in firsts[1:]:
        if other[1] != firsts[0][1]:
            raise VaegenError(mixed_shapes(firsts[0], other))
    return firsts[0][1]


def splits_record(rows_of: dict[str, int], done: list[dict]) -> dict:
    """The manifest's splits: each one's rows and its shards' records in order."""
    ordered = sorted(done, key=lambda d: d["index"])
    return {split: {"rows": rows, "shards": [d["shard"] for d in ordered if d["split"] == split]}
            for split, rows in rows_of.items()}


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
