"""The generation driver: ties the package's pieces together (the package docstring lists them).

One job, as run_job runs it: plan_job (model, labels, input shards, job id) → take the job's lease → verify
what is on storage (finished shards, a committed manifest) → if the job is committed and intact, return its
manifest; else withdraw `_SUCCESS`, start DecoderWorkers for the missing shards (each builds, publishes and
receipts whole shards under data/) → commit (`_manifest.json`, the dataset card README.md, then `_SUCCESS`) →
release the lease.

Several drivers of one job (a cron retry overlapping a slow run, a user rerunning it): the second one WAITS on
the lease, then resumes as usual, which for a job the holder finished means: verify, and return the committed
manifest without writing anything. Waiting was chosen over sharing the work because it needs no coordination
beyond the lease and costs nothing when drivers die: a killed holder blocks the job for at most one lease TTL.
The lease is not what makes it correct: two drivers running at once (an expired lease, a stalled holder) only
duplicate work, since shards are idempotent, verification never deletes and the commit checks what it names."""
from __future__ import annotations

import dataclasses
import os
import time

from tqdm.auto import tqdm

from cluster.generate.commit import commit, job_lease, job_run_record, read_committed_manifest, verified_shards
from cluster.generate.lease import lease_ttl
from cluster.generate.plan import JobPlan, plan_job
from cluster.generate.pool import placed_settings, run_shards, start_workers, stop_workers
from cluster.generate.settings import RunSettings
from cluster.runtime.ray_session import ray_runtime
from cluster.store.storage import Storage, open_storage
from vae_core.config import AUTO_WORKERS, StorageConfig
from vae_core.errors import VaegenError
from vae_core.use_configs import GenerateConfig


def run_job(spec: GenerateConfig, storage_cfg: StorageConfig, settings: RunSettings = RunSettings(),
            **changes) -> dict:
    """Plan, take the job's lease, resume, run the missing shards on DecoderWorker actors, commit; returns the
    manifest, with this run's answers added: `run` (how it went) and `uri` (where the job is now: records name
    no location, so a copied root reports its own). `changes` are RunSettings fields to change
    (run_job(spec, cfg, workers=4))."""
    settings = dataclasses.replace(settings, **changes) if changes else settings
    lease_ttl()                                  # a bad $VAEGEN_LEASE_TTL_S is refused before any work
    started = time.perf_counter()
    storage = open_storage(storage_cfg, for_writing=True)
    plan = plan_job(spec, storage)
    planned = time.perf_counter()
    with job_lease(storage, plan):
        manifest = run_leased(plan, storage, storage_cfg, settings, (started, planned))
    return {**manifest, "uri": storage.uri_of(plan.prefix)}


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
    # Steady state: the rate after each worker's first shard (which carries its start and pipeline fill).
    timeline = {"warm_at": 0.0, "warm_rows": 0, "last_at": 0.0, "rows": 0, "startup": None}
    if todo:
        with ray_runtime(settings.address), job_run_record(storage, plan):     # _run.json for `vaegen ls`
            joined = bool(settings.address or os.environ.get("RAY_ADDRESS"))
            settings = placed_settings(settings, plan, storage)          # --workers auto: sized to the cluster
            no_idle = dataclasses.replace(settings, workers=min(settings.workers, len(todo)))
            actors = start_workers(plan, storage_cfg, no_idle, joined=joined)
            shards_started = time.perf_counter()
            try:
                with tqdm(total=plan.total_rows, initial=skipped_rows, unit="img", unit_scale=True,
                          desc=f"{spec.kind} {plan.job_id}", disable=not settings.progress) as bar:
                    def on_done(record: dict) -> None:
                        nonlocal written
                        records.add(record, built=True)
                        written += 1
                        bar.update(record["rows"])
                        timeline.update(last_at=time.perf_counter(), rows=timeline["rows"] + record["rows"])
                        if written == len(actors):
                            timeline.update(warm_at=timeline["last_at"], warm_rows=timeline["rows"])
                    run_shards(actors, todo, on_done)
            finally:
                stop_workers(actors)
            shard_seconds = time.perf_counter() - shards_started
            timeline["startup"] = shards_started - verified
    else:
        shard_seconds = 0.0
    new_rows = plan.total_rows - skipped_rows
    workers = 0 if settings.workers == AUTO_WORKERS else settings.workers          # auto: sized only when shards ran
    run = {"workers": workers, "shards_written": written, "shards_skipped": plan.num_shards - len(todo),
           "rows_written": new_rows, "seconds": time.perf_counter() - started, "shard_seconds": shard_seconds,
           "samples_per_s": new_rows / shard_seconds if shard_seconds else None, **phases,
           "startup_seconds": timeline["startup"],          # verified → Ray up, every worker holding its model
           "steady_samples_per_s": (timeline["rows"] - timeline["warm_rows"]) / steady_span
           if (steady_span := timeline["last_at"] - timeline["warm_at"]) > 0 and timeline["warm_at"] else None}
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
