"""What a storage root holds (`vaegen ls`): datasets, model versions (champion marked) and generation jobs with
their state, read from the records the jobs themselves leave:

- finished: `_SUCCESS` is there (then `manifest.json` says everything);
- failed: no `_SUCCESS`, and the run record `_run.json` says the last run stopped on an error;
- partial: anything else (running now, interrupted, or killed): n of m shards done, from the receipts.

The run record is written by the generation driver around its Ray work (`job_run_record`): `running` when the
shards start, `shards-done` after them (the commit follows), `failed` (with the error's first line) or
`interrupted` when they stop early. Killed drivers
leave `running`, which reads as partial: the next run resumes either way."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .datasets import MANIFEST as DATASET_MANIFEST
from .datasets import dataset_key
from .registry import Registry
from .storage import Storage

OUTPUTS = "outputs"
JOB_MANIFEST, JOB_SUCCESS, JOB_RECEIPTS, RUN_RECORD = "manifest.json", "_SUCCESS", "_receipts", "_run.json"


# -- the run record (written by cluster.generate.run_job) ----------------------------------------------------
@contextmanager
def job_run_record(storage: Storage, plan):
    """Record that a run of `plan` started; on an exception record how it ended, then re-raise."""
    key = f"{plan.prefix}/{RUN_RECORD}"
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


# -- jobs ---------------------------------------------------------------------------------------------------
def read_committed_manifest(storage: Storage, prefix: str) -> dict | None:
    """A finished job's manifest, or None. Trusted only when `_SUCCESS` names the sha256 of manifest.json's
    bytes: a manifest rewritten by another driver after this _SUCCESS, or a stray _SUCCESS, is not a commit."""
    success_key, manifest_key = f"{prefix}/{JOB_SUCCESS}", f"{prefix}/{JOB_MANIFEST}"
    if not storage.exists(success_key) or not storage.exists(manifest_key):
        return None
    try:
        want = json.loads(storage.read_bytes(success_key))["manifest_sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    body = storage.read_bytes(manifest_key)
    if hashlib.sha256(body).hexdigest() != want:
        return None
    return json.loads(body)


@dataclass
class JobStatus:
    job_id: str
    state: str                        # finished | partial | failed
    kind: str = "?"
    model: str = "?"
    format: str = "?"
    shards_done: int = 0
    shards_planned: int | None = None  # None: unknown (no run record and no manifest)
    rows_done: int = 0
    rows_planned: int | None = None
    error: str = ""
    when: float | None = None          # finished: created_at; else the run's start
    manifest: dict | None = None
    receipts: list[dict] = field(default_factory=list)

    @property
    def progress(self) -> str:
        planned = "?" if self.shards_planned is None else self.shards_planned
        return f"{self.shards_done}/{planned}"


def job_prefix(job_id: str) -> str:
    return f"{OUTPUTS}/{job_id}"


def job_status(storage: Storage, job_id: str, *, with_receipts: bool = False) -> JobStatus:
    prefix = job_prefix(job_id)
    if storage.exists(f"{prefix}/{JOB_SUCCESS}") and storage.exists(f"{prefix}/{JOB_MANIFEST}"):
        m = json.loads(storage.read_bytes(f"{prefix}/{JOB_MANIFEST}"))
        t = m["totals"]
        return JobStatus(job_id, "finished", m["kind"], m["model"], m["format"], t["shards"], t["shards"],
                         t["rows"], t["rows"], when=m["created_at"], manifest=m, receipts=m["shards"])
    run_key = f"{prefix}/{RUN_RECORD}"
    run = json.loads(storage.read_bytes(run_key)) if storage.exists(run_key) else {}
    receipt_keys = [e.key for e in storage.list(f"{prefix}/{JOB_RECEIPTS}") if e.key.endswith(".json")]
    receipts = []
    if with_receipts:
        receipts = sorted((json.loads(storage.read_bytes(k)) for k in receipt_keys), key=lambda r: r["index"])
    status = JobStatus(job_id, "failed" if run.get("status") == "failed" else "partial",
                       run.get("kind", job_id.split("-")[0]), run.get("model", "?"), run.get("format", "?"),
                       len(receipt_keys), run.get("planned_shards"), sum(r["rows"] for r in receipts),
                       run.get("planned_rows"), run.get("error", ""), run.get("started_at"), receipts=receipts)
    return status


def list_jobs(storage: Storage) -> list[JobStatus]:
    return [job_status(storage, job_id) for job_id in storage.list_dirs(OUTPUTS)]


# -- datasets and models ------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    name: str
    image_shape: tuple[int, ...]
    classes: int
    splits: dict[str, int]            # split -> rows


def list_datasets(storage: Storage) -> list[DatasetInfo]:
    found = []
    for name in storage.list_dirs("datasets"):
        key = dataset_key(name, DATASET_MANIFEST)
        if storage.exists(key):                     # no manifest: an unfinished ingest, invisible to readers
            m = json.loads(storage.read_bytes(key))
            found.append(DatasetInfo(name, tuple(m["image_shape"]), len(m["label_names"]),
                                     {s: v["rows"] for s, v in m["splits"].items()}))
    return found


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    champion: bool
    test_loss: float | None           # from metrics.json, when the version has one


def list_models(storage: Storage) -> list[ModelVersionInfo]:
    registry, found = Registry(storage), []
    for name in registry.names():
        champion = (registry.champion(name) or {}).get("version")
        for version in registry.versions(name):
            key = registry.key(name, version, "metrics.json")
            metrics = json.loads(storage.read_bytes(key)) if storage.exists(key) else {}
            found.append(ModelVersionInfo(name, version, version == champion, metrics.get("test_loss")))
    return found
