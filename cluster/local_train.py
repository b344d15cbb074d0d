"""The single-process backend of cluster.training.train_model: vae_core.fit in this process, with a checkpoint
per epoch under train-runs/<run-id>/ (model, optimizer, early-stopping state, history, RNG position) so that a
killed run resumes where it stopped."""
from __future__ import annotations

import io
import re

import torch
from tqdm.auto import tqdm

from vae_core.config import TrainJobConfig
from vae_core.models import VAE
from vae_core.train import EpochMetrics, FitResult, ImageSet, fit

from .epoch_samples import EpochSampleWriter
from .runs import run_key
from .storage import Storage

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{5,})\.pt$")
CHECKPOINTS_KEPT = 2          # the latest, and the one before it in case the latest is being replaced


def checkpoint_name(epochs_done: int) -> str:
    return f"checkpoint-{epochs_done:05d}.pt"


def fit_in_process(storage: Storage, job: TrainJobConfig, model: VAE, train_set: ImageSet, val_set: ImageSet,
                   progress: bool) -> FitResult:
    """Fit `model` (left at its best weights), resuming the run's latest checkpoint and writing one per epoch."""
    run = run_key(job)
    saved, done = latest_checkpoint(storage, run)

    def save(state: dict) -> None:
        epochs = len(state["history"])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.publish(f"{run}/{checkpoint_name(epochs)}", buffer.getvalue())
        for old in done:
            if old <= epochs - CHECKPOINTS_KEPT:
                storage.delete(f"{run}/{checkpoint_name(old)}")
        done[:] = [e for e in done if e > epochs - CHECKPOINTS_KEPT] + [epochs]

    resumed_at = len(saved["history"]) if saved else 0
    epoch_samples = EpochSampleWriter(storage, run, model)
    with tqdm(total=job.train.epochs, initial=resumed_at, unit="epoch", desc=f"train {job.name}",
              disable=not progress) as bar:
        def on_epoch(m: EpochMetrics) -> None:
            epoch_samples(model, m.epoch)
            bar.set_postfix(loss=f"{m.loss:.1f}", val=f"{m.val_loss:.1f}", kl=f"{m.kl:.1f}",
                            img_s=f"{m.images_per_s:,.0f}")
            bar.update()
        return fit(model, train_set, val_set, job.train, on_epoch, checkpoint=saved, save=save)


def latest_checkpoint(storage: Storage, run: str) -> tuple[dict | None, list[int]]:
    """(the run's latest checkpoint or None, the epoch counts of every checkpoint it has)."""
    found = sorted(int(m.group(1)) for e in storage.list(run) if (m := CHECKPOINT_RE.match(e.key.rsplit("/", 1)[-1])))
    if not found:
        return None, []
    data = storage.read_bytes(f"{run}/{checkpoint_name(found[-1])}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), found
