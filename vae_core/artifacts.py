"""Everything a model version holds besides its weights, as bytes: metrics, sample and reconstruction grids,
loss curves, and the per-epoch sample grid (the same latents decoded after every epoch, as in PyTorch's VAE
example). The single-process and the Ray trainers both call these; every grid is grid_png's (which says how it
differs from torchvision's), laid out as vae_core.grids says (whose captions the gallery shows beside them)."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from .checkpoint import checkpoint_files
from .grids import NROW, PER_CLASS, SAMPLES
from .images import image_grid
from .models import VAE
from .plots import loss_curves_png
from .train import EpochMetrics

GRID_SEED = 1234
EPOCH_SAMPLES_SEED = 4321     # the fixed latents decoded after every epoch
# The one difference from torchvision's defaults: make_grid pads with black (pad_value=0); Fashion-MNIST's clothes
# sit on black, so black borders would run the tiles together. White ones (pad_value=1) keep each image apart.
PAD_VALUE = 1.0


def grid_png(images: torch.Tensor, nrow: int = NROW) -> bytes:
    """(N, C, H, W) floats in [0, 1] → one PNG of `nrow` images a row: the bytes of torchvision's
    `save_image(images, f, nrow=nrow, padding=2, pad_value=PAD_VALUE)`, i.e. make_grid's defaults except white
    borders where make_grid draws black ones (PAD_VALUE says why). Made without importing torchvision, which costs
    the driver seconds just after training. The pixels are rounded as save_image rounds them (x·255 + 0.5,
    truncated), not as to_uint8 does."""
    tiles = images.detach().float().cpu().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    if tiles.shape[1] == 1:
        tiles = tiles.repeat(3, axis=1)                  # make_grid draws grey images as RGB
    grid = image_grid(tiles, ncols=min(nrow, len(tiles)))
    buffer = io.BytesIO()
    Image.fromarray(grid.transpose(1, 2, 0)).save(buffer, format="png")
    return buffer.getvalue()


def grid_labels(model: VAE) -> torch.Tensor | None:
    """PER_CLASS labels per class, in class order, for a conditional model's grid; None for an unconditional one."""
    return torch.arange(model.cfg.num_classes).repeat_interleave(PER_CLASS) if model.cfg.conditional else None


def prior_latents(model: VAE, seed: int, n: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents from p(z | y) (the fitted prior, if the model has one), seeded, with their grid labels."""
    labels = grid_labels(model)
    return model.sample_prior(n if labels is None else len(labels), labels, torch.Generator().manual_seed(seed)), labels


def epoch_latents(model: VAE, n: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed latents of the per-epoch grids: from N(0, I), the prior training uses (a fitted prior comes only
    after training), on CPU and seeded, so every epoch and every backend decodes the same ones."""
    labels = grid_labels(model)
    g = torch.Generator().manual_seed(EPOCH_SAMPLES_SEED)
    return torch.randn(n if labels is None else len(labels), model.cfg.latent_dim, generator=g), labels


@torch.no_grad()
def sample_grid(model: VAE, n: int = SAMPLES, seed: int = GRID_SEED) -> bytes:
    """Decoder means of latents from the prior (grids.samples_caption says how they are laid out)."""
    z, labels = prior_latents(model, seed, n)
    return grid_png(model.generate(z, labels), nrow=PER_CLASS if labels is not None else NROW)


@torch.no_grad()
def epoch_sample_grid(model: VAE, latents: tuple[torch.Tensor, torch.Tensor | None]) -> bytes:
    """One decode of the run's fixed latents (epoch_latents) with the weights as they are now: a run's grids,
    epoch after epoch, show the same latents as training goes."""
    device = next(model.parameters()).device
    z, labels = latents
    images = model.generate(z.to(device), None if labels is None else labels.to(device))
    return grid_png(images, nrow=PER_CLASS if labels is not None else NROW)


@torch.no_grad()
def reconstruction_grid(model: VAE, images: torch.Tensor, labels: torch.Tensor | None, n: int = 32) -> bytes:
    """Row pairs (grids.RECON_CAPTION): originals above, reconstructions (from the posterior mean) below."""
    images = images[:n]
    labels = None if labels is None else labels[:n]
    originals = images.float() / 255.0
    recon, _ = model.reconstruct(originals, labels)
    rows = []
    for start in range(0, len(images), NROW):
        rows += [originals[start:start + NROW], recon[start:start + NROW].cpu()]
    return grid_png(torch.cat(rows), nrow=NROW)


def loss_curves(history: Sequence[EpochMetrics], best_epoch: int | None = None) -> bytes:
    return loss_curves_png([m.to_dict() for m in history], best_epoch=best_epoch)


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
    files["curves.png"] = loss_curves(history, summary.get("best_epoch"))
    return files
