"""What the driver keeps on storage about a job, and how it ends one: the ledger of finished shards, their
verification on resume, the run record, the lease, and the commit.

- Resume: the driver reads each receipt and re-hashes its shard. Nothing is ever deleted: a bad or missing
  shard is only left out of the ledger, and redoing it goes through the worker's publish path (create if
  absent, else compare sha256, replace only a corrupt object), which is safe whoever else is writing.
- A finished job is trusted only when `_SUCCESS` names the sha256 of _manifest.json
  (read_committed_manifest, below: the one check every reader uses) and every shard verifies; one found damaged has its `_SUCCESS` withdrawn
  before any repair (the driver does that).
- The commit checks every shard against its receipt on storage (size from one listing; sha256 re-read for those
  this run did not build), then writes _manifest.json, the dataset card, then `_SUCCESS` = {manifest_sha256},
  and reads both back: a commit interleaved with another driver's is redone.
- The lease (cluster/generate/lease.py) makes a second driver of the job wait; correctness never depends on it.
- The run record (_run.json) tells `vaegen ls` whether the last run is running, failed or was interrupted."""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import random
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from cluster.generate.lease import JobLease
from cluster.store.layout import OUTPUT_FORMAT_VERSION, JobKeys, receipt_name, shard_braces, shard_name
from cluster.store.records import (
    RECORD_ERRORS,
    CorruptRecord,
    OtherFormat,
    as_object,
    fields,
    parse_record,
    read_record,
    sha256_hex,
)
from cluster.store.storage import Storage
from vae_core import __version__
from vae_core.config import to_dict
from vae_core.errors import VaegenError

if TYPE_CHECKING:
    from cluster.generate.plan import JobPlan

RERUN_JOB = "rerun the same generate command to repair it"

# A local temp file this old is a publish that died (a publish lives for seconds); younger ones may be another
# run's publish in flight, so the commit leaves them alone.
STALE_TEMP_S = 3600.0
COMMIT_ATTEMPTS = 5              # manifest + _SUCCESS rewrites when another driver's commit interleaves with ours
VERIFY_CHUNK = 1024              # receipts checked per batch on resume (bounds the driver's futures)


def is_publish_temp(name: str) -> bool:
    """Whether a local file name is one of Storage.publish's temp files (.<name>.tmp-<random>)."""
    return name.startswith(".") and ".tmp-" in name


class ShardLedger:
    """The driver's per-shard state: which shards are done and their manifest fields, in flat arrays set aside
    once rather than a dict per shard, so the driver's memory per shard is a few fixed-size array rows even for
    the largest jobs (bench/scale.py measures it)."""

    def __init__(self, plan: JobPlan) -> None:
        self.format, self.num_shards, self.split = plan.spec.format, plan.num_shards, plan.split
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
        return {"name": shard_name(index, self.format, self.num_shards, self.split), "rows": rows, "first_id": first_id,
                "last_id": None if last_id < 0 else last_id, "bytes": size,
                "sha256": self.digests[index, 0].tobytes().hex(),
                "pixels_sha256": self.digests[index, 1].tobytes().hex()}

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
    present = {e.key[len(plan.prefix) + 1:]: e.size for e in storage.list(plan.keys.data)}     # by shard name

    def check(receipt_key: str) -> dict | None:
        try:
            record = json.loads(storage.read_bytes(receipt_key))
            index = record["index"]
            task = plan.task(index) if isinstance(index, int) and 0 <= index < plan.num_shards else None
            if task is None or (record["name"], record["rows"], record["first_id"]) != (
                    plan.shard_name(index), task.rows, task.first_id):
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
    import torch
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
        name, size = plan.shard_name(index), int(records.counts[index, 3])
        if listed.get(name) != size or receipt_name(name) not in listed:
            bad.append(name)
    if not bad:
        rehash = np.flatnonzero(~records.built).tolist()

        def changed(index: int) -> str | None:
            digest = records.digests[index, 0].tobytes().hex()
            return None if sha256_hex(storage.read_bytes(plan.shard_key(index))) == digest else \
                plan.shard_name(index)
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
            if is_publish_temp(key.rsplit("/", 1)[-1]):
                try:
                    if now - os.stat(storage.path(plan.keys.key(key))).st_mtime > STALE_TEMP_S:
                        storage.delete(plan.keys.key(key))
                except FileNotFoundError:
                    pass


def commit(storage: Storage, plan: JobPlan, records: ShardLedger, run: dict) -> dict:
    """Check every shard (check_before_commit), then _manifest.json (one line per shard, built as bytes straight
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
                "prefix": plan.prefix,
                "totals": {"rows": ids, "shards": plan.num_shards, "bytes": records.total_bytes()},
                "run": run, "created_at": time.time(), "label_names": list(plan.label_names),
                "split": plan.split, "shard_pattern": shard_braces(plan.spec.format, plan.num_shards, plan.split)}
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
        from cluster.generate.card import publish_dataset_card  # huggingface_hub: not for readers of a job
        publish_dataset_card(storage, json.loads(body))      # the card (README.md), before _SUCCESS
        storage.publish(plan.keys.success, success)
        if (storage.read_bytes(plan.keys.success) == success
                and sha256_hex(storage.read_bytes(plan.keys.manifest)) == manifest_sha256):
            return json.loads(body)                          # as a resumed run will read it back
    raise VaegenError(f"job {plan.job_id}: other drivers kept rewriting its commit; every shard is in place: "
                      "rerun the same command to commit")


@contextmanager
def job_lease(storage: Storage, plan: JobPlan) -> Iterator[JobLease]:
    """Hold the job's lease, waiting (with one line on stderr) while another driver holds a live one."""
    lease = JobLease(storage, plan.keys.lease)

    def waiting(holder: dict) -> None:
        left = max(0, round(holder["expires_at"] - time.time()))
        print(f"vaegen: job {plan.job_id} is being run by {holder['owner']!r}; waiting for it to finish or stop "
              f"(its lease {storage.uri_of(plan.keys.lease)} expires in {left} s unless renewed)",
              file=sys.stderr, flush=True)
    lease.acquire(on_wait=waiting)
    try:
        yield lease
    finally:
        lease.release()


@contextmanager
def job_run_record(storage: Storage, plan: JobPlan) -> Iterator[None]:
    """Record in _run.json that a run of `plan` started; when it stops, how (shards-done, failed with the
    error's first line, or interrupted), then re-raise. A killed driver leaves `running`, which `vaegen ls`
    shows as partial: the next run resumes either way."""
    key = plan.keys.run_record
    record = {"job_id": plan.job_id, "kind": plan.spec.kind, "format": plan.spec.format, "model": plan.model_ref,
              "planned_shards": plan.num_shards, "planned_rows": plan.total_rows, "host": socket.gethostname(),
              "pid": os.getpid(), "started_at": time.time(), "status": "running"}
    storage.publish(key, json.dumps(record, indent=2).encode())
    try:
        yield
        record.update(status="shards-done", ended_at=time.time())     # the commit (_SUCCESS) follows
        storage.publish(key, json.dumps(record, indent=2).encode())
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
        status = "interrupted" if interrupted else "failed"
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        record.update(status=status, ended_at=time.time(), error=error)
        try:
            storage.publish(key, json.dumps(record, indent=2).encode())
        except Exception:                      # the storage itself may be what failed: keep the first error
            pass
        raise


# -- the trust check every reader uses (resume, `ls`, `show`, the gallery) ----------------------------------
def read_committed_manifest(storage: Storage, prefix: str) -> dict | None:
    """A finished job's manifest, or None. Trusted only when `_SUCCESS` names the sha256 of the manifest's
    bytes: a manifest rewritten by another driver after this _SUCCESS, or a stray _SUCCESS, is not a commit."""
    keys = JobKeys(prefix)
    success_key, manifest_key_ = keys.success, keys.manifest
    if not storage.exists(success_key) or not storage.exists(manifest_key_):
        return None
    try:
        want = json.loads(storage.read_bytes(success_key))["manifest_sha256"]
    except RECORD_ERRORS:
        return None
    body = storage.read_bytes(manifest_key_)
    if hashlib.sha256(body).hexdigest() != want:
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    # Committed: from here on, a manifest that is not what a commit writes is corrupt, not uncommitted. One of
    # another output format is not repaired: the version is in the job id, so the same command makes a new job.
    other_format = isinstance(record, dict) and record.get("output_format_version") != OUTPUT_FORMAT_VERSION
    fix = "the same generate command makes the job anew, under a new id" if other_format else RERUN_JOB
    return parse_record(body, storage.uri_of(manifest_key_), fix, _job_manifest)


def _job_manifest(record) -> dict:
    """A job manifest with the fields readers use, of the kinds a commit writes them."""
    fields(record, {"job_id": str, "kind": str, "format": str, "model": str, "created_at": float,
                    "totals": dict, "shards": list, "output_format_version": int})
    if record["output_format_version"] != OUTPUT_FORMAT_VERSION:
        raise OtherFormat(f"output format {record['output_format_version']}; this vaegen reads "
                          f"{OUTPUT_FORMAT_VERSION}")
    fields(record["totals"], {"shards": "count", "rows": "count"})
    for shard in record["shards"]:                 # the list's order is the shards' index
        fields(shard, {"name": str, "rows": "count"})
    return record


def uncommitted_reason(storage: Storage, prefix: str) -> CorruptRecord | None:
    """Why a job whose `_SUCCESS` exists is not committed (read_committed_manifest said None); None when it
    is committed after all (a driver finished its commit between the two reads)."""
    keys = JobKeys(prefix)
    success_key, manifest_key_ = keys.success, keys.manifest
    want = read_record(storage, success_key, RERUN_JOB, lambda r: str(r["manifest_sha256"]))
    if not storage.exists(manifest_key_):
        return CorruptRecord(storage.uri_of(manifest_key_), "is missing though _SUCCESS is there", RERUN_JOB)
    if hashlib.sha256(storage.read_bytes(manifest_key_)).hexdigest() == want:
        if read_committed_manifest(storage, prefix) is not None:
            return None
    read_record(storage, manifest_key_, RERUN_JOB, as_object)        # not JSON / not an object: say so
    return CorruptRecord(storage.uri_of(success_key), f"names manifest sha256 {want[:16]}…, not that of the "
                         f"{manifest_key_.rsplit('/', 1)[1]} beside it (an interrupted or interleaved commit)",
                         RERUN_JOB)
