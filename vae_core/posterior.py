"""After training: fit the prior to the encoder's posteriors (vae_core/prior.py's mixture) and measure the gain."""
from __future__ import annotations

import torch
from torch import Tensor

from .config import TrainConfig
from .models import VAE
from .prior import EM_ITERATIONS, fit_mixture, log_standard_normal
from .progress import progress_bar
from .train import ImageSet, iterate_batches, prepare_batch

# Binarised training sees a fresh binarisation of each image every epoch, so its aggregate posterior is the
# average over binarisations: the prior is fitted to this many encodings of each image (one for grey levels,
# whose encoding is deterministic).
PRIOR_BINARISATIONS = 4


@torch.no_grad()
def fit_prior(model: VAE, train: ImageSet, cfg: TrainConfig, held_out: ImageSet | None = None,
              progress: bool = False) -> dict[str, float]:
    """Replace the model's N(0, I) by a Gaussian mixture (M = prior_components, per class when conditional)
    fitted to the training images' posteriors q(z | x) (vae_core.prior.fit_mixture). The encoder and decoder
    stay as trained, so the ELBO changes by E_q[log p_fitted(z) − log N(z; 0, I)] alone: returned per image, in
    nats, on the training images and on `held_out` (estimated with one posterior sample per image). `progress`:
    a bar over the EM iterations, the slow part."""
    if model.prior is None:
        raise ValueError("this model has no prior to fit (ModelConfig.prior_components is 0)")
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    passes = PRIOR_BINARISATIONS if cfg.binarize else 1
    encodings = [posterior_moments(model, train, cfg, generator) for _ in range(passes)]
    mu, var = (torch.cat(part) for part in zip(*encodings))
    labels = None if train.labels is None else train.labels.repeat(passes)
    groups = [slice(None)] if model.prior.groups == 1 else [labels == g for g in range(model.prior.groups)]
    components = model.cfg.prior_components
    with progress_bar(total=len(groups) * EM_ITERATIONS if components > 1 else None, unit="EM step",
                      desc=f"fit the prior ({components} Gaussians{' per class' if len(groups) > 1 else ''})",
                      enabled=progress and components > 1) as bar:
        fits = [fit_mixture(mu[rows], var[rows], components, generator, EM_ITERATIONS, bar.update)
                for rows in groups]
    model.prior.load(*(torch.stack(part) for part in zip(*fits)))
    gains = {"prior_elbo_gain_train": prior_gain(model, posterior_sample(*encodings[0], generator), train.labels)}
    if held_out is not None and len(held_out):
        held_out_z = posterior_sample(*posterior_moments(model, held_out, cfg, generator), generator)
        gains["prior_elbo_gain_val"] = prior_gain(model, held_out_z, held_out.labels)
    return gains


def posterior_moments(model: VAE, data: ImageSet, cfg: TrainConfig, generator: torch.Generator,
                      batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """q(z | x) of every image, on the inputs training saw (binarised if it binarised): means and variances,
    (N, Z) each."""
    mus, variances = [], []
    for images, labels in iterate_batches(data, batch_size):
        mu, logvar = model.encode(prepare_batch(images, cfg, generator), labels)
        mus.append(mu)
        variances.append(logvar.exp())
    return torch.cat(mus), torch.cat(variances)


def posterior_sample(mu: Tensor, var: Tensor, generator: torch.Generator) -> Tensor:
    return mu + var.sqrt() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)


def prior_gain(model: VAE, z: Tensor, labels: Tensor | None, rows: int = 4096) -> float:
    """Mean of log p(z | y) − log N(z; 0, I) over z (N, Z): the ELBO gain of the model's prior over N(0, I)."""
    total = 0.0
    for s in range(0, len(z), rows):
        part, y = z[s:s + rows], None if labels is None else labels[s:s + rows]
        total += (model.log_prior(part, y) - log_standard_normal(part)).sum().item()
    return total / max(len(z), 1)
