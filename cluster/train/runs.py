"""A training run on storage, whatever the backend: its id, its settings (_job.json), the model version it
became (_published.json), the data and initial weights it starts from, its summary and its publish.

A run's id, unless given, is derived from the settings it pins, the dataset generation and the seed
(with_run_id): the same `vaegen train` twice is one run, never two versions of the same weights.

train-runs/<run-id>/ holds _job.json (the settings the run started with: a rerun with the same id must ask for
the same training), the backend's checkpoints, and _published.json once a version is published. The publish
names the run (Registry.publish's run reservation), so a driver that stopped after publishing but before
writing _published.json gets the same version back on its rerun, never a second one."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from cluster.data.datasets import read_split
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import Storage
from cluster.train.epoch_samples import epoch_sample_files
from vae_core.artifacts import model_version_files
from vae_core.config import TrainJobConfig, to_dict
from vae_core.errors import VaegenError
from vae_core.models import VAE, build_model
from vae_core.posterior import fit_prior
from vae_core.train import (
    EpochMetrics,
    FitResult,
    ImageSet,
    evaluate,
    iterate_batches,
    mean_image,
    split_indices,
    start_output,
)

RUNS_DIR = "train-runs"
JOB_FILE = "_job.json"
PUBLISHED_FILE = "_published.json"
# _job.json's layout: bumped when its fields change (2: no storage section, so a copied root names no old place).
RUN_LAYOUT = "vaegen-run-2"


@dataclass
class TrainResult:
    ref: ModelRef
    history: list[EpochMetrics]
    summary: dict
    already_trained: bool = False      # the run had published before: this call trained nothing


def with_run_id(job: TrainJobConfig, manifest: dict, initial_state: dict[str, torch.Tensor] | None) -> TrainJobConfig:
    """The job with its run id: one derived from what it trains (every setting _job.json pins, the warm start, the
    seed among them) and the dataset generation it reads, when it has none. The same command on the same data is
    then the same run: rerun, it resumes from its checkpoint or returns the version it published."""
    if job.run_id:
        return job
    pinned = {"job": job_record(job, initial_state), "dataset_generation": manifest["generation"]}
    digest = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    return replace(job, run_id=f"{job.name[:100]}-{digest[:16]}")


def fresh_run_id(job: TrainJobConfig) -> TrainJobConfig:
    """The job with a run id of its own when it has none: a scheduled retrain trains a new challenger each time."""
    if job.run_id:
        return job
    return replace(job, run_id=f"{job.name[:100]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def run_key(job: TrainJobConfig) -> str:
    return f"{RUNS_DIR}/{job.run_id}"


def job_settings(job: TrainJobConfig) -> dict:
    """The training job as records under the root keep it (_job.json, config.json, decision records): every
    setting but the storage's, since where the root is, is not what the run is, and a root copied or synced
    elsewhere must not name the place it was written in."""
    return {k: v for k, v in to_dict(job).items() if k != "storage"}


def job_record(job: TrainJobConfig, initial_state: dict[str, torch.Tensor] | None) -> dict:
    """What _job.json pins: every setting that changes the weights (Ray's restart and retention counts do not,
    nor where the root is or how S3 is reached), and the warm start's weights, if any."""
    ray = None if job.ray is None else replace(job.ray, max_failures=0, checkpoints_to_keep=1)
    record = json.loads(json.dumps(job_settings(replace(job, ray=ray))))  # tuples as lists, as JSON gives them back
    record["warm_start_sha256"] = None if initial_state is None else state_digest(initial_state)
    record["layout"] = RUN_LAYOUT
    return record


def run_started(storage: Storage, job: TrainJobConfig) -> bool:
    return storage.exists(f"{run_key(job)}/{JOB_FILE}")


def claim_run(storage: Storage, job: TrainJobConfig, initial_state: dict[str, torch.Tensor] | None) -> None:
    """Record the run's settings; a rerun with the same id must ask for the same training."""
    mine = job_record(job, initial_state)
    key = f"{run_key(job)}/{JOB_FILE}"
    if storage.publish(key, json.dumps(mine, sort_keys=True).encode(), if_absent=True):
        return
    theirs = json.loads(storage.read_bytes(key))
    if not isinstance(theirs, dict) or theirs.get("layout") != RUN_LAYOUT:
        # An earlier vaegen's run: its checkpoints would resume into a different run than the one they began.
        raise VaegenError(f"run {job.run_id!r} was started by an earlier vaegen whose checkpoints this one cannot "
                          "resume; use a new --run-id")
    diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diffs:
        raise VaegenError(f"run {job.run_id!r} was started with other settings ({', '.join(diffs)} differ): "
                          "its checkpoints are incompatible; use a new --run-id")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def finished_run(storage: Storage, job: TrainJobConfig) -> TrainResult | None:
    """The version this run already published (a rerun of a finished run trains nothing), or None."""
    run = run_key(job)
    if storage.exists(f"{run}/{PUBLISHED_FILE}"):
        done = json.loads(storage.read_bytes(f"{run}/{PUBLISHED_FILE}"))
        return TrainResult(ModelRef(done["name"], done["version"]), [EpochMetrics(**m) for m in done["history"]],
                           done["summary"], already_trained=True)
    registry = Registry(storage)
    version = registry.published_by(job.name, job.run_id)
    if version is not None and registry.is_complete(job.name, version):     # published, then stopped
        metrics = registry.metrics(ModelRef(job.name, version))
        result = TrainResult(ModelRef(job.name, version), [EpochMetrics(**m) for m in metrics.get("history", [])],
                             {k: v for k, v in metrics.items() if k != "history"}, already_trained=True)
        record_published(storage, job, result)
        return result
    return None


def record_published(storage: Storage, job: TrainJobConfig, result: TrainResult) -> None:
    """_published.json: the version the run became (a rerun returns it without training)."""
    storage.publish(f"{run_key(job)}/{PUBLISHED_FILE}", json.dumps(
        {"name": result.ref.name, "version": result.ref.version, "summary": result.summary,
         "history": [m.to_dict() for m in result.history]}).encode())


def to_image_set(split) -> ImageSet:
    return ImageSet(torch.from_numpy(split.images), torch.from_numpy(split.labels))


class TrainingRows(NamedTuple):
    """The training split divided once, by the run's seeded split, for every backend: the rows trained on and the
    held-out rows (both in id order), and the ids of the rows trained on (what Ray Data keeps when it streams)."""
    train: ImageSet
    val: ImageSet
    train_ids: np.ndarray


def read_train_val(storage: Storage, job: TrainJobConfig, manifest: dict) -> TrainingRows:
    """The training split in memory (from the manifest the job read: one dataset generation throughout), the
    held-out images separated by the job's seeded split: the same seed always holds out the same rows."""
    loaded = read_split(storage, job.dataset, "train", limit=job.train.max_images, manifest=manifest)
    train_idx, val_idx = (i.sort().values for i in split_indices(len(loaded.ids), job.train.val_fraction,
                                                                   job.train.seed))
    rows = to_image_set(loaded)
    return TrainingRows(rows.subset(train_idx), rows.subset(val_idx), loaded.ids[train_idx.numpy()])


def initial_model(job: TrainJobConfig, train_set: ImageSet, initial_state: dict[str, torch.Tensor] | None) -> VAE:
    """The weights every backend starts from: seeded, the decoder at the mean image, or a warm start."""
    torch.manual_seed(job.train.seed)
    model = build_model(job.model)
    start_output(model, mean_image(train_set), job.train)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    return model


def training_summary(job: TrainJobConfig, fitted: FitResult, train_set: ImageSet, val_set: ImageSet,
                     started: float) -> dict:
    """metrics.json's summary of a run, the same keys for every backend (Ray's settings only on a Ray run)."""
    first_batch = [s["first_batch_at"] for s in fitted.starts if s["first_batch_at"] >= started]
    summary = {"best_epoch": fitted.best_epoch, "best_val_loss": fitted.best_val_loss,
               "epochs_run": len(fitted.history), "stopped_early": fitted.stopped_early,
               "train_images": len(train_set), "val_images": len(val_set), "seconds": time.time() - started,
               "run_id": job.run_id, "backend": "single-process" if job.ray is None else "ray",
               "resumed_at_epochs": [s["epoch"] for s in fitted.starts],
               "seconds_to_first_batch": first_batch[0] - started if first_batch else None}
    if job.ray is not None:
        summary.update(workers=job.ray.workers, gpus_per_worker=job.ray.gpus_per_worker,
                       sync_every=job.ray.sync_every)
    return summary


def publish_trained_model(storage: Storage, job: TrainJobConfig, manifest: dict, model: VAE,
                          history: list[EpochMetrics], summary: dict, train_set: ImageSet,
                          val_set: ImageSet, progress: bool = False) -> TrainResult:
    """Fit the prior (if the model has one to fit), score on the test split, then publish weights, config,
    metrics and grids as the run's model version (the one layout every backend writes): the version this run
    already published or began to publish, never a second one."""
    if model.prior is not None:
        started = time.perf_counter()
        summary = {**summary, **fit_prior(model, train_set, job.train, held_out=val_set, progress=progress),
                   "prior_fit_seconds": time.perf_counter() - started}
    summary = {**summary, **score_on_test_split(storage, job, manifest, model)}
    files = model_version_files(
        model, history, summary=summary,
        config_extra={"train_job": job_settings(job), "dataset_manifest_sha256": manifest_digest(manifest)},
        val_images=val_set.images, val_labels=val_set.labels)
    files.update(epoch_sample_files(storage, run_key(job)))       # samples/sample_N.png, one per epoch
    ref = Registry(storage).publish(job.name, files, run_id=job.run_id)
    return TrainResult(ref, history, summary)


def score_on_test_split(storage: Storage, job: TrainJobConfig, manifest: dict, model: VAE) -> dict:
    """Loss per image on the test split (the figure papers quote), when the dataset has one."""
    if "test" not in manifest["splits"]:
        return {}
    test = to_image_set(read_split(storage, job.dataset, "test", manifest=manifest))
    means = evaluate(model, iterate_batches(test, 1024), job.train)
    return {"test_loss": means["loss"], "test_recon": means["recon"], "test_kl": means["kl"],
            "test_images": len(test)}


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()
