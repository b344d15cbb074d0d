"""`vaegen train` in one process: dataset from storage → vae_core.fit → a model version in the registry."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from vae_core.artifacts import model_version_files
from vae_core.config import TrainJobConfig, to_dict
from vae_core.models import VAE, build_model
from vae_core.train import (EpochMetrics, ImageSet, evaluate, fit, fit_prior, iterate_batches, mean_image,
                            split_train_val, start_output)

from .datasets import bind_model_to_dataset, read_manifest, read_split
from .registry import ModelRef, Registry
from .storage import Storage, open_storage


@dataclass
class TrainResult:
    ref: ModelRef
    history: list[EpochMetrics]
    summary: dict


def to_image_set(split) -> ImageSet:
    return ImageSet(torch.from_numpy(split.images), torch.from_numpy(split.labels))


def train_single_process(job: TrainJobConfig, progress: bool = True,
                         initial_state: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """initial_state: weights to start from (a warm start, e.g. the champion's), else a fresh init."""
    storage = open_storage(job.storage, for_writing=True)
    manifest = read_manifest(storage, job.dataset)
    model_cfg = bind_model_to_dataset(job.model, manifest, job.conditional)
    job = replace(job, model=model_cfg)
    train_set, val_set = read_train_val(storage, job, manifest)
    torch.manual_seed(job.train.seed)
    model = build_model(model_cfg)
    start_output(model, mean_image(train_set), job.train)
    if initial_state is not None:
        model.load_state_dict(initial_state)

    started = time.perf_counter()
    with tqdm(total=job.train.epochs, unit="epoch", desc=f"train {job.name}", disable=not progress) as bar:
        def on_epoch(m: EpochMetrics) -> None:
            bar.set_postfix(loss=f"{m.loss:.1f}", val=f"{m.val_loss:.1f}", kl=f"{m.kl:.1f}",
                            img_s=f"{m.images_per_s:,.0f}")
            bar.update()
        result = fit(model, train_set, val_set, job.train, on_epoch)
    summary = {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
               "epochs_run": len(result.history), "stopped_early": result.stopped_early,
               "train_images": len(train_set), "val_images": len(val_set),
               "seconds": time.perf_counter() - started, "workers": 1}
    return publish_trained_model(storage, job, manifest, model, result.history, summary, train_set, val_set)


def read_train_val(storage: Storage, job: TrainJobConfig, manifest: dict) -> tuple[ImageSet, ImageSet]:
    """The training split in memory (from the manifest the job read: one dataset generation throughout), held-out
    images separated by the job's seeded split."""
    train_split = read_split(storage, job.dataset, "train", limit=job.train.max_images, manifest=manifest)
    return split_train_val(to_image_set(train_split), job.train.val_fraction, job.train.seed)


def publish_trained_model(storage: Storage, job: TrainJobConfig, manifest: dict, model: VAE,
                          history: list[EpochMetrics], summary: dict, train_set: ImageSet,
                          val_set: ImageSet, run_id: str | None = None) -> TrainResult:
    """Fit the prior (if the model has one to fit), score on the test split, then publish weights, config,
    metrics and grids as the next model version (the one layout every trainer writes). With `run_id` (a
    resumable run), the version that run already published or began to publish, never a second one; without
    (a single-process run, which cannot be resumed), every call is a new version."""
    if model.prior is not None:
        started = time.perf_counter()
        summary = {**summary, **fit_prior(model, train_set, job.train, held_out=val_set),
                   "prior_fit_seconds": time.perf_counter() - started}
    summary = {**summary, **score_on_test_split(storage, job, manifest, model)}
    files = model_version_files(
        model, history, summary=summary,
        config_extra={"train_job": to_dict(job), "dataset_manifest_sha256": manifest_digest(manifest)},
        val_images=val_set.images, val_labels=val_set.labels)
    ref = Registry(storage).publish(job.name, files, run_id=run_id)
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
