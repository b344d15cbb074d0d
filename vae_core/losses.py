"""Free, typed loss functions. Every value is per image, in nats, summed over pixels."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per image, analytic (VAE paper, appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """−log p(x | logits) per image: binary cross-entropy summed over pixels (x may be grey levels)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_nll(mean: Tensor, x: Tensor, log_sigma: Tensor) -> Tensor:
    """−log N(x; mean, σ²) per image, σ shared by all pixels (fixed or learned)."""
    per_pixel = 0.5 * ((x - mean) * torch.exp(-log_sigma)).pow(2) + log_sigma + 0.5 * LOG_2PI
    return per_pixel.flatten(1).sum(1)


def reconstruction_nll(logits: Tensor, x: Tensor, likelihood: str, log_sigma: Tensor) -> Tensor:
    if likelihood == "bernoulli":
        return bernoulli_nll(logits, x)
    return gaussian_nll(torch.sigmoid(logits), x, log_sigma)


@dataclass
class LossTerms:
    """Batch means, per image: loss = recon + β·KL."""
    loss: Tensor
    recon: Tensor
    kl: Tensor


def elbo_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, likelihood: str,
              log_sigma: Tensor, beta: float = 1.0) -> LossTerms:
    recon = reconstruction_nll(logits, x, likelihood, log_sigma)
    kl = kl_divergence(mu, logvar)
    return LossTerms(loss=(recon + beta * kl).mean(), recon=recon.mean(), kl=kl.mean())
