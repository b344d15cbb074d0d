"""The single-process backend of cluster.train.driver.train_model: vae_core.fit in this process, with a checkpoint
per epoch under train-runs/<run-id>/ (model, optimizer, early-stopping state, history, RNG position) so that a
killed run resumes where it stopped."""
from __future__ import annotations

import io
import re

import torch
from vae_core.progress import progress_bar

from cluster.store.storage import Storage
from cluster.train.epoch_samples import EpochSampleWriter
from cluster.train.runs import run_key
from vae_core.config import TrainJobConfig
from vae_core.models import VAE
from vae_core.train import EpochMetrics, FitResult, ImageSet, fit

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{5,})\.pt$")
CHECKPOINTS_KEPT = 2          # the latest, and the one before it in case the latest is being replaced
DEVICE_SHARE = 0.5            # the most of a GPU's free memory the images may take: the rest is the model's,
                              # its activations' and the allocator's


def training_device() -> torch.device:
    """Where the single-process trainer trains: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fits_on_device(nbytes: int, device: torch.device | str, free_bytes: int | None = None) -> bool:
    """Whether `nbytes` of images may live on `device` for the whole run (free_bytes: the device's free memory,
    measured when not given). The host trivially holds what it already holds."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free_bytes


def resident(data: ImageSet, device: torch.device | str, free_bytes: int | None = None) -> ImageSet:
    """The set moved to `device` once, for the whole run, when it fits there (on the device it already lives on:
    the same tensors, no copy); else the set itself, and the trainer copies each batch as it uses it."""
    size = data.images.nbytes + (0 if data.labels is None else data.labels.nbytes)
    if not fits_on_device(size, device, free_bytes):
        return data
    return ImageSet(data.images.to(device), None if data.labels is None else data.labels.to(device))


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
    # One bar over every epoch's images, moved per step: a one-epoch run moves too. Early stopping ends it short.
    with progress_bar(total=job.train.epochs * len(train_set), initial=resumed_at * len(train_set), unit="img",
                      unit_scale=True, desc=f"train {job.name}", enabled=progress) as bar:
        def on_epoch(m: EpochMetrics) -> None:
            epoch_samples(model, m.epoch)
            bar.set_postfix(epoch=f"{m.epoch + 1}/{job.train.epochs}", loss=f"{m.loss:.1f}", val=f"{m.val_loss:.1f}",
                            kl=f"{m.kl:.1f}")
        device = training_device()
        model.to(device)
        try:
            # The held-out images first: they are read every epoch too, and are the smaller set.
            val_on_device = resident(val_set, device)
            return fit(model, resident(train_set, device), val_on_device, job.train, on_epoch, checkpoint=saved,
                       save=save, on_batch=lambda _epoch, n: bar.update(n))
        finally:
            model.to("cpu")          # publishing, the prior fit and the figures after training run on the host


def latest_checkpoint(storage: Storage, run: str) -> tuple[dict | None, list[int]]:
    """(the run's latest checkpoint or None, the epoch counts of every checkpoint it has)."""
    found = sorted(int(m.group(1)) for e in storage.list(run) if (m := CHECKPOINT_RE.match(e.key.rsplit("/", 1)[-1])))
    if not found:
        return None, []
    data = storage.read_bytes(f"{run}/{checkpoint_name(found[-1])}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), found
