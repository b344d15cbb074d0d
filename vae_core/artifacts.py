"""Everything a model version holds besides its weights, as bytes: metrics, sample and reconstruction grids,
loss curves. The single-process and the Ray trainers both call `model_version_files`."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_files
from .images import curves_png, image_grid, png_bytes, to_uint8
from .models import VAE
from .train import EpochMetrics

GRID_SEED = 1234


def sample_grid(model: VAE, n: int = 64, seed: int = GRID_SEED) -> bytes:
    """Decoder means of latents from the prior; a conditional model shows one row per class."""
    g = torch.Generator().manual_seed(seed)
    if model.cfg.conditional:
        per_class = 8
        labels = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)
        z = model.sample_prior(len(labels), labels, g)
        return png_bytes(image_grid(to_uint8(model.generate(z, labels)), ncols=per_class))
    return png_bytes(image_grid(to_uint8(model.generate(model.sample_prior(n, None, g)))))


def reconstruction_grid(model: VAE, images: torch.Tensor, labels: torch.Tensor | None, n: int = 32) -> bytes:
    """Row pairs: originals above, reconstructions (from the posterior mean) below."""
    images = images[:n]
    labels = None if labels is None else labels[:n]
    recon, _ = model.reconstruct(images.float() / 255.0, labels)
    ncols = 8
    rows = []
    for start in range(0, len(images), ncols):
        rows += [images[start:start + ncols].numpy(), to_uint8(recon[start:start + ncols])]
    return png_bytes(image_grid(np.concatenate(rows), ncols=ncols))


def loss_curves(history: Sequence[EpochMetrics]) -> bytes:
    return curves_png({"train loss": [m.loss for m in history], "val loss": [m.val_loss for m in history]})


def model_version_files(model: VAE, history: Sequence[EpochMetrics], *, summary: Mapping[str, Any],
                        config_extra: Mapping[str, Any], val_images: torch.Tensor,
                        val_labels: torch.Tensor | None) -> dict[str, bytes]:
    """weights + config.json (+ training settings) + metrics.json + samples/recon/curves PNGs."""
    model.eval()
    files = checkpoint_files(model, extra=config_extra)
    metrics = {**summary, "history": [m.to_dict() for m in history]}
    files["metrics.json"] = json.dumps(metrics, indent=2, sort_keys=True).encode()
    files["samples.png"] = sample_grid(model)
    files["recon.png"] = reconstruction_grid(model, val_images, val_labels)
    files["curves.png"] = loss_curves(history)
    return files
