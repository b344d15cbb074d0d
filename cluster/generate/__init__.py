"""Bulk samples and reconstructions: a shard plan from a job spec, DecoderWorker actors that each build and
publish whole shards, and the driver that resumes, verifies and commits. Shard protocol (DESIGN.md):

- The job id hashes the spec with the model resolved to a version, its weights' sha256 and its config.json's
  sha256: the same spec resumes the same job under outputs/<job-id>/, and a model edited in place is a new job.
  Each DecoderWorker checks both hashes against the plan before it builds anything.
- Shard i depends only on (spec, i): latents from a generator seeded by (seed, i), a fixed decode batch size,
  one torch thread, deterministic writers. Any worker, retry or rerun writes the same bytes.
- A worker builds the whole shard in memory, validates it, publishes it as one object if absent (S3: one PUT
  with If-None-Match; locally temp + link), then a small receipt (_receipts/part-i.json: rows, ids, bytes,
  sha256, pixels sha256). If the shard was already there, its sha256 must equal ours, else it is replaced.
- On resume the driver reads each receipt and re-hashes its shard; nothing is ever deleted: a bad or missing
  shard is redone through the publish path above. A finished job is trusted only when `_SUCCESS` names the
  sha256 of manifest.json (inventory.read_committed_manifest) and every shard verifies; one found damaged has
  its `_SUCCESS` withdrawn before any repair.
- The commit checks every shard against its receipt on storage (size from one listing; sha256 re-read for those
  this run did not build), then writes manifest.json, the dataset card, then `_SUCCESS` = {manifest_sha256},
  and reads both back: a commit interleaved with another driver's is redone.

Several drivers of one job (a cron retry overlapping a slow run, a user rerunning it): the second one WAITS.
Each driver takes the job's lease (cluster/job_lease.py: outputs/<job-id>/_lease.json, created if absent,
renewed while it runs, an expired one taken over by compare-and-swap) before it verifies; a driver that finds a
live lease waits for it to be released or to expire, then resumes as usual, which for a job the holder finished
means: verify, and return the committed manifest without writing anything. Waiting was chosen over sharing the
work because it needs no coordination beyond the lease and costs nothing when drivers die: a killed holder
blocks the job for at most one lease TTL. The lease is not what makes it correct: two drivers running at once
(an expired lease, a stalled holder) only duplicate work, since shards are idempotent, verification never
deletes and the commit checks what it names."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import random
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from vae_core import __version__
from vae_core.config import GenerateConfig, StorageConfig, to_dict
from vae_core.errors import VaegenError

from ..dataset_card import publish_dataset_card
from ..inventory import job_run_record, read_committed_manifest
from ..job_lease import JobLease
from ..layout import receipt_name, shard_braces, shard_name
from ..storage import Storage, open_storage
from .plan import OUTPUT_FORMAT_VERSION, JobPlan, ShardTask, plan_job, sha256_hex
from .pool import start_workers, run_shards, stop_workers
from .settings import RunSettings
from .shards import ShardMaker

# A local temp file this old is a publish that died (a publish lives for seconds); younger ones may be another
# run's publish in flight, so the commit leaves them alone.
STALE_TEMP_S = 3600.0
COMMIT_ATTEMPTS = 5              # manifest + _SUCCESS rewrites when another driver's commit interleaves with ours
VERIFY_CHUNK = 1024               # receipts checked per batch on resume (bounds the driver's futures)


# -- the driver ---------------------------------------------------------------------------------------------
class ShardLedger:
    """The driver's per-shard state: which shards are done and their manifest fields, in flat arrays set aside
    once (~100 bytes a shard) rather than a dict per shard (~1.3 KiB: bench/scale.py measured 3.1 KiB of driver
    RSS per shard with dicts), so that 10^6 shards fit in ~100 MB."""

    def __init__(self, plan: JobPlan) -> None:
        self.format = plan.spec.format
        self.done = np.zeros(plan.num_shards, bool)
        self.counts = np.zeros((plan.num_shards, 4), np.int64)        # rows, first_id, last_id (-1: none), bytes
        self.digests = np.zeros((plan.num_shards, 2, 32), np.uint8)   # sha256, pixels_sha256
        self.built = np.zeros(plan.num_shards, bool)                  # by this run's workers (else: verified)

    def add(self, record: dict, *, built: bool = False) -> None:
        index = record["index"]
        self.built[index] = built
        last_id = -1 if record["last_id"] is None else record["last_id"]
        self.counts[index] = (record["rows"], record["first_id"], last_id, record["bytes"])
        for k, field in enumerate(("sha256", "pixels_sha256")):
            self.digests[index, k] = np.frombuffer(bytes.fromhex(record[field]), np.uint8)
        self.done[index] = True

    def __contains__(self, index: int) -> bool:
        return bool(self.done[index])

    def __len__(self) -> int:
        return int(self.done.sum())

    def missing(self) -> list[int]:
        return np.flatnonzero(~self.done).tolist()

    def rows(self) -> int:
        return int(self.counts[self.done, 0].sum())

    def total_bytes(self) -> int:
        return int(self.counts[self.done, 3].sum())

    def entry(self, index: int) -> dict:
        """Shard `index` as the manifest lists it."""
        rows, first_id, last_id, size = self.counts[index].tolist()
        return {"name": shard_name(index, self.format), "rows": rows, "first_id": first_id,
                "last_id": None if last_id < 0 else last_id, "bytes": size,
                "sha256": self.digests[index, 0].tobytes().hex(), "pixels_sha256": self.digests[index, 1].tobytes().hex()}

    def matches(self, shards: list) -> bool:
        """Whether a manifest's shard list is exactly what this ledger holds."""
        return (len(self) == len(shards) == len(self.done)
                and all(shard == self.entry(index) for index, shard in enumerate(shards)))


def verified_shards(storage: Storage, plan: JobPlan) -> ShardLedger:
    """Shards already on storage whose bytes match their receipt. Nothing is deleted here, ever: a shard that
    fails (missing, truncated, corrupt, or published by another driver while we looked) is only left out, and
    redoing it goes through the normal publish path (create if absent, else compare sha256, replace only a
    corrupt object), which is safe whoever else is writing. Receipts are listed before shards: a worker publishes
    a shard before its receipt, so every receipt of the first listing has its shard in the second. Then two GETs
    per shard (receipt, shard re-hashed)."""
    receipts = [e.key for e in storage.list(plan.keys.receipts) if e.key.endswith(".json")]
    present = {e.key.rsplit("/", 1)[1]: e.size for e in storage.list(plan.prefix)}

    def check(receipt_key: str) -> dict | None:
        try:
            record = json.loads(storage.read_bytes(receipt_key))
            index = record["index"]
            task = plan.task(index) if isinstance(index, int) and 0 <= index < plan.num_shards else None
            if task is None or (record["name"], record["rows"], record["first_id"]) != (
                    shard_name(index, plan.spec.format), task.rows, task.first_id):
                return None
        except (ValueError, KeyError, TypeError):
            return None                                             # an unreadable receipt: redo its shard
        if present.get(record["name"]) != record["bytes"]:
            return None
        if sha256_hex(storage.read_bytes(plan.shard_key(index))) != record["sha256"]:
            return None
        return record

    ledger = ShardLedger(plan)
    with ThreadPoolExecutor(max_workers=4) as pool:                 # I/O bound; one shard in memory per thread
        for start in range(0, len(receipts), VERIFY_CHUNK):         # map() makes every future at once: chunk
            for record in pool.map(check, receipts[start:start + VERIFY_CHUNK]):
                if record is not None:
                    ledger.add(record)
    return ledger


def library_versions() -> dict[str, str]:
    import PIL
    import pyarrow
    return {"vaegen": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "pillow": PIL.__version__,
            "zlib": zlib.ZLIB_RUNTIME_VERSION}


def check_before_commit(storage: Storage, plan: JobPlan, records: ShardLedger) -> None:
    """Every shard the manifest will name must be on storage as recorded. One recursive listing gives each
    shard's size and its receipt's presence; shards this run did not build itself (verified from receipts at the
    start, possibly hours ago) are also re-hashed, one GET each. Shards this run's workers built are not: each
    worker published them or compared the object already there with its own bytes, and no vaegen writer ever
    replaces an object holding the right bytes, so re-reading them would double a fresh run's I/O for nothing."""
    listed = {e.key[len(plan.prefix) + 1:]: e.size for e in storage.list(plan.prefix, recursive=True)}
    bad = []
    for index in range(plan.num_shards):
        name, size = shard_name(index, plan.spec.format), int(records.counts[index, 3])
        if listed.get(name) != size or receipt_name(name) not in listed:
            bad.append(name)
    if not bad:
        rehash = np.flatnonzero(~records.built).tolist()

        def changed(index: int) -> str | None:
            digest = records.digests[index, 0].tobytes().hex()
            return None if sha256_hex(storage.read_bytes(plan.shard_key(index))) == digest else \
                shard_name(index, plan.spec.format)
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(rehash), VERIFY_CHUNK):
                bad += filter(None, pool.map(changed, rehash[start:start + VERIFY_CHUNK]))
    if bad:
        raise VaegenError(f"job {plan.job_id}: {len(bad)} shard(s) changed on storage during this run "
                          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was committed: rerun "
                          "the same command to repair them")
    if not storage.is_s3:                  # temp files of publishes that died; younger ones may be in flight
        now = time.time()
        for key in listed:
            if key.rsplit("/", 1)[-1].startswith(".") and ".tmp-" in key:
                try:
                    if now - os.stat(storage.path(f"{plan.prefix}/{key}")).st_mtime > STALE_TEMP_S:
                        storage.delete(f"{plan.prefix}/{key}")
                except FileNotFoundError:
                    pass


def commit(storage: Storage, plan: JobPlan, records: ShardLedger, run: dict) -> dict:
    """Check every shard (check_before_commit), then manifest.json (one line per shard, built as bytes straight
    from the ledger), the dataset card, then _SUCCESS naming the manifest's sha256. Another driver's commit of
    the same job can interleave (its manifest between ours and our _SUCCESS): the result is read back, and the
    two writes are redone until _SUCCESS names the manifest that is there. A commit of the very same shards by
    another driver is accepted as ours."""
    if len(records) != plan.num_shards:
        raise RuntimeError(f"job {plan.job_id}: {plan.num_shards - len(records)} shards missing at commit")
    ids = records.rows()
    if ids != plan.total_rows:
        raise RuntimeError(f"job {plan.job_id}: shards hold {ids} rows, planned {plan.total_rows}")
    check_before_commit(storage, plan, records)
    manifest = {"job_id": plan.job_id, "kind": plan.spec.kind, "format": plan.spec.format,
                "spec": to_dict(plan.spec), "model": plan.model_ref, "weights_sha256": plan.weights_sha256,
                "config_sha256": plan.config_sha256,
                "image_shape": list(plan.image_shape), "labels": list(plan.labels),
                "output_format_version": OUTPUT_FORMAT_VERSION, "libraries": library_versions(),
                "prefix": plan.prefix, "uri": storage.uri_of(plan.prefix),
                "totals": {"rows": ids, "shards": plan.num_shards, "bytes": records.total_bytes()},
                "run": run, "created_at": time.time(), "label_names": list(plan.label_names),
                "shard_pattern": shard_braces(plan.spec.format, plan.num_shards)}
    body = io.BytesIO()
    body.write(json.dumps(manifest, indent=2)[:-2].encode() + b',\n  "shards": [')
    for index in range(plan.num_shards):
        body.write((",\n    " if index else "\n    ").encode() + json.dumps(records.entry(index)).encode())
    body.write(b"\n  ]\n}")
    body = body.getvalue()
    manifest_sha256 = sha256_hex(body)
    success = json.dumps({"manifest_sha256": manifest_sha256}).encode()
    for attempt in range(COMMIT_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(0.05, 0.5) * attempt)
            committed = read_committed_manifest(storage, plan.prefix)
            if committed is not None and records.matches(committed["shards"]):
                return {**committed, "run": run}           # another driver committed these very shards meanwhile
        storage.publish(plan.keys.manifest, body)
        publish_dataset_card(storage, json.loads(body))      # README.md for the Hub / `datasets`, before _SUCCESS
        storage.publish(plan.keys.success, success)
        if (storage.read_bytes(plan.keys.success) == success
                and sha256_hex(storage.read_bytes(plan.keys.manifest)) == manifest_sha256):
            return json.loads(body)                          # as a resumed run will read it back
    raise VaegenError(f"job {plan.job_id}: other drivers kept rewriting its commit; every shard is in place: "
                      "rerun the same command to commit")


def run_job(spec: GenerateConfig, storage_cfg: StorageConfig, settings: RunSettings = RunSettings(),
            **changes) -> dict:
    """Plan, take the job's lease, resume, run the missing shards on DecoderWorker actors, commit; returns the
    manifest. `changes` are RunSettings fields to change (run_job(spec, cfg, workers=4))."""
    settings = dataclasses.replace(settings, **changes) if changes else settings
    started = time.perf_counter()
    storage = open_storage(storage_cfg, for_writing=True)
    plan = plan_job(spec, storage)
    planned = time.perf_counter()
    lease = JobLease(storage, plan.keys.lease)

    def waiting(holder: dict) -> None:
        print(f"vaegen: job {plan.job_id} is being run by {holder.get('owner', '?')}; waiting for it to finish or "
              "stop", file=sys.stderr, flush=True)
    lease.acquire(on_wait=waiting)
    try:
        return run_leased(plan, storage, storage_cfg, settings, (started, planned))
    finally:
        lease.release()


def run_leased(plan: JobPlan, storage: Storage, storage_cfg: StorageConfig, settings: RunSettings,
               clock: tuple[float, float]) -> dict:
    """run_job's work once it holds the job's lease (or the lease expired: nothing here relies on it)."""
    spec, (started, planned), leased = plan.spec, clock, time.perf_counter()
    success_key = plan.keys.success
    committed = read_committed_manifest(storage, plan.prefix)
    records = verified_shards(storage, plan)
    verified = time.perf_counter()
    phases = {"plan_seconds": planned - started, "lease_wait_seconds": leased - planned,
              "verify_seconds": verified - leased}
    todo = records.missing()
    if committed is not None and not todo and records.matches(committed["shards"]):   # finished and intact
        return {**committed, "run": {"workers": 0, "shards_written": 0, "shards_skipped": plan.num_shards,
                                     "rows_written": 0, "seconds": time.perf_counter() - started,
                                     "shard_seconds": 0.0, "samples_per_s": None, "already_complete": True,
                                     **phases}}
    if storage.exists(success_key):
        storage.delete(success_key)          # withdrawn before any repair: readers stop trusting the job first
    skipped_rows = records.rows()
    written = 0
    if todo:
        from ..runtime import ray_runtime
        with ray_runtime(settings.address), job_run_record(storage, plan):     # _run.json for `vaegen ls`
            joined = bool(settings.address or os.environ.get("RAY_ADDRESS"))
            actors = start_workers(plan, storage_cfg, dataclasses.replace(settings, workers=min(settings.workers,
                                                                                                len(todo))),
                                   joined=joined)
            shards_started = time.perf_counter()
            try:
                with tqdm(total=plan.total_rows, initial=skipped_rows, unit="img", unit_scale=True,
                          desc=f"{spec.kind} {plan.job_id}", disable=not settings.progress) as bar:
                    def on_done(record: dict) -> None:
                        nonlocal written
                        records.add(record, built=True)
                        written += 1
                        bar.update(record["rows"])
                    run_shards(actors, todo, on_done)
            finally:
                stop_workers(actors)
            shard_seconds = time.perf_counter() - shards_started
    else:
        shard_seconds = 0.0
    new_rows = plan.total_rows - skipped_rows
    run = {"workers": settings.workers, "shards_written": written, "shards_skipped": plan.num_shards - len(todo),
           "rows_written": new_rows, "seconds": time.perf_counter() - started, "shard_seconds": shard_seconds,
           "samples_per_s": new_rows / shard_seconds if shard_seconds else None, **phases}
    committing = time.perf_counter()
    manifest = commit(storage, plan, records, run)
    manifest["run"]["commit_seconds"] = time.perf_counter() - committing      # this run's answer only
    return manifest


def run_generation(spec: GenerateConfig, storage_cfg: StorageConfig, settings: RunSettings = RunSettings(),
                   **changes) -> dict:
    """Samples: latents from the model's prior (N(0, I), or the mixture fitted to it) decoded to images, as
    shards under outputs/<job-id>/; returns the manifest."""
    if spec.kind != "samples":
        raise VaegenError(f"run_generation takes kind='samples', got {spec.kind!r}")
    return run_job(spec, storage_cfg, settings, **changes)


def run_reconstruction(spec: GenerateConfig, storage_cfg: StorageConfig, settings: RunSettings = RunSettings(),
                       **changes) -> dict:
    """Reconstructions of a dataset split, one output shard per input shard; returns the manifest."""
    if spec.kind != "reconstructions":
        raise VaegenError(f"run_reconstruction takes kind='reconstructions', got {spec.kind!r}")
    return run_job(spec, storage_cfg, settings, **changes)
