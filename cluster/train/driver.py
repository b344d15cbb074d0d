"""The one way to train: `vaegen train`, `vaegen retrain` and `vaegen pipeline` all call train_model, which picks
the backend from the job's config (job.ray: None = this process, else Ray Train) and runs the same steps around
it: check the dataset, claim the run, start from the same initial weights, fit, publish once per run id."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from cluster.data.datasets import bind_model_to_dataset, read_manifest
from cluster.runtime.placement import joined_for_sizing, sized_training
from cluster.runtime.ray_join import CONNECT_TIMEOUT_S
from cluster.store.name_binding import Binding, check_binding
from cluster.store.storage import open_storage_to_write_later
from cluster.train.in_process import fit_in_process
from cluster.train.on_ray import check_ray_job, fit_on_ray
from cluster.train.runs import (
    TrainResult,
    claim_run,
    finished_run,
    initial_model,
    publish_trained_model,
    read_train_val,
    record_published,
    run_started,
    training_summary,
    with_run_id,
)
from vae_core.config import TrainJobConfig


def train_model(job: TrainJobConfig, *, address: str | None = None, progress: bool = True,
                initial_state: dict[str, torch.Tensor] | None = None,
                connect_timeout: float = CONNECT_TIMEOUT_S) -> TrainResult:
    """Train `job` and publish it as a model version. job.run_id names the run (if empty, an id derived from the
    settings, the dataset generation and the seed): the same id resumes it from its last checkpoint, and a
    finished run returns its published version (TrainResult.already_trained). `address` joins a Ray cluster (Ray
    backend only), waiting `connect_timeout` s for it; `initial_state` is a warm start (e.g. the champion's
    weights)."""
    with joined_for_sizing(job, address, connect_timeout):
        job = sized_training(job, address, connect_timeout)    # --workers auto: numbers before anything records them
        return train_sized(job, address, progress, initial_state, connect_timeout)


def train_sized(job: TrainJobConfig, address: str | None, progress: bool,
                initial_state: dict[str, torch.Tensor] | None, connect_timeout: float) -> TrainResult:
    """train_model once the job's workers are numbers."""
    started = time.time()
    storage = open_storage_to_write_later(job.storage)
    manifest = read_manifest(storage, job.dataset)            # no dataset: refused before the root is written
    storage.check_writable()
    job = replace(job, model=bind_model_to_dataset(job.model, manifest, job.conditional))
    check_binding(storage, job.name, Binding(job.dataset, job.model.image_shape))   # other data: another name
    job = with_run_id(job, manifest, initial_state)            # the same command on the same data: the same run
    if job.ray is not None:
        check_ray_job(job, manifest)
    if run_started(storage, job):                 # a rerun: the same settings, and maybe finished already
        claim_run(storage, job, initial_state)
        done = finished_run(storage, job)
        if done is not None:
            return done
    # Read (and checksum) once, before the run is claimed: bad data leaves nothing on storage. The mean image
    # starts the decoder, and after training the same images fit the prior and draw the reconstruction grid.
    train_set, val_set, train_ids = read_train_val(storage, job, manifest)
    claim_run(storage, job, initial_state)
    model = initial_model(job, train_set, initial_state)
    if job.ray is None:
        fitted = fit_in_process(storage, job, model, train_set, val_set, progress)
    else:
        fitted = fit_on_ray(storage, job, manifest, model, train_set, val_set, train_ids, address=address,
                            progress=progress, connect_timeout=connect_timeout)
    summary = training_summary(job, fitted, train_set, val_set, started)
    result = publish_trained_model(storage, job, manifest, model, fitted.history, summary, train_set, val_set,
                                   progress)
    record_published(storage, job, result)
    return result
