"""Per-epoch sample grids, as in PyTorch's VAE example (`sample_N.png`): the same fixed latents decoded after
every epoch, by the single process or Ray Train's rank 0, written through Storage beside the run's checkpoints
(train-runs/<run-id>/samples/sample_N.png, N = 1-based epoch) and copied into the model version it publishes
(models/<name>/<version>/samples/sample_N.png). One decode of 64 latents an epoch: a few milliseconds.
The drawing code (and torch) loads with the writer: `vaegen show` lists the grids by these names alone."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cluster.store.storage import Storage

if TYPE_CHECKING:
    from vae_core.models import VAE

SAMPLES_DIR = "samples"
SAMPLE_RE = re.compile(r"^sample_(\d+)\.png$")


def sample_name(epoch: int) -> str:
    """sample_N.png for the 0-based epoch `epoch` (N = epoch + 1, the epoch a person counts)."""
    return f"sample_{epoch + 1}.png"


class EpochSampleWriter:
    """Decodes the run's fixed latents after each epoch and publishes the grid under `prefix`/samples/."""

    def __init__(self, storage: Storage, prefix: str, model: VAE) -> None:
        from vae_core.artifacts import epoch_latents
        self.storage, self.prefix = storage, prefix
        self.latents = epoch_latents(model)

    def __call__(self, model: VAE, epoch: int) -> None:
        from vae_core.artifacts import epoch_sample_grid
        grid = epoch_sample_grid(model, self.latents)
        self.storage.publish(f"{self.prefix}/{SAMPLES_DIR}/{sample_name(epoch)}", grid)


def epoch_sample_files(storage: Storage, prefix: str) -> dict[str, bytes]:
    """{"samples/sample_N.png": bytes} of every per-epoch grid under `prefix`, in epoch order."""
    found = sorted((int(m.group(1)), e.key.rsplit("/", 1)[-1]) for e in storage.list(f"{prefix}/{SAMPLES_DIR}")
                   if (m := SAMPLE_RE.match(e.key.rsplit("/", 1)[-1])))
    return {f"{SAMPLES_DIR}/{name}": storage.read_bytes(f"{prefix}/{SAMPLES_DIR}/{name}") for _, name in found}
