"""The prior p(z) (p(z | y) for a conditional model): N(0, I) while training, optionally refitted afterwards.

A VAE trained against N(0, I) does not fill N(0, I): its aggregate posterior q(z) = E_x q(z | x) has holes and
lumps, so prior samples land where the decoder was never trained, and log p(x) pays for the mismatch. The best
prior for a trained encoder and decoder is q(z) itself (Hoffman & Johnson 2016), so after training we fit a
mixture of M full-covariance Gaussians to q(z), the training images' posterior Gaussians (ex-post density
estimation, Ghosh et al. 2020). The encoder and decoder do not change; only E_q[log p(z)] in the ELBO moves,
and `prior_gain` measures by how much. A conditional model gets one mixture per class; M = 1 is the closed-form
moment match."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .losses import LOG_2PI

JITTER = 1e-3                 # added to every fitted covariance: no component collapses onto a point
EM_ITERATIONS = 50
FIT_ROWS = 8192               # rows of z scored against all components at once in EM (memory ~ rows·M·Z)


class MixturePrior(nn.Module):
    """G groups (classes, or 1) × M components: weights (logits), means and Cholesky factors, as buffers so
    they travel in the model's safetensors. Built as N(0, I) (every component identical); `load` sets a fit."""

    def __init__(self, groups: int, components: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(groups, components))
        self.register_buffer("loc", torch.zeros(groups, components, dim))
        self.register_buffer("scale_tril", torch.eye(dim).repeat(groups, components, 1, 1))

    @property
    def groups(self) -> int:
        return self.logits.shape[0]

    def load(self, logits: Tensor, loc: Tensor, scale_tril: Tensor) -> None:
        for name, value in (("logits", logits), ("loc", loc), ("scale_tril", scale_tril)):
            getattr(self, name).copy_(value)

    def sample(self, n: int, labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
        """n latents (n, Z) on the CPU, where the (CPU) generator draws: a component per row by its weight,
        then loc + L·ε."""
        logits, loc, scale_tril = self.logits.cpu(), self.loc.cpu(), self.scale_tril.cpu()   # small; any device
        eps = torch.randn(n, loc.shape[-1], generator=generator)
        g = torch.zeros(n, dtype=torch.long) if self.groups == 1 else labels.long().cpu()
        if logits.shape[1] == 1:
            k = torch.zeros(n, dtype=torch.long)
        else:
            k = torch.multinomial(torch.softmax(logits[g], 1), 1, generator=generator).squeeze(1)
        return loc[g, k] + (scale_tril[g, k] @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """log p(z | y) for z (..., B, Z) with labels (B,): (..., B)."""
        if self.groups == 1:
            return mixture_log_prob(z, self.logits[0], self.loc[0], self.scale_tril[0])
        out = z.new_empty(z.shape[:-1])
        for g in labels.unique().tolist():
            rows = labels == g
            out[..., rows] = mixture_log_prob(z[..., rows, :], self.logits[g], self.loc[g], self.scale_tril[g])
        return out


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def weighted_log_normals(z: Tensor, logits: Tensor, loc: Tensor, scale_tril: Tensor) -> Tensor:
    """log π_k + log N(z; μ_k, L_k L_kᵀ) for z (..., Z) and M components: (..., M)."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    precision = torch.linalg.solve_triangular(scale_tril, eye, upper=False)         # L⁻¹, (M, Z, Z)
    u = torch.einsum("...j,kij->...ki", z, precision) - (precision @ loc.unsqueeze(-1)).squeeze(-1)
    log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)            # (M,)
    return torch.log_softmax(logits, -1) - 0.5 * (z.shape[-1] * LOG_2PI + u.pow(2).sum(-1)) - log_det


def mixture_log_prob(z: Tensor, logits: Tensor, loc: Tensor, scale_tril: Tensor) -> Tensor:
    """log Σ_k π_k N(z; μ_k, L_k L_kᵀ): (...)."""
    return torch.logsumexp(weighted_log_normals(z, logits, loc, scale_tril), -1)


def fit_mixture(mu: Tensor, var: Tensor | None, components: int, generator: torch.Generator,
                iterations: int = EM_ITERATIONS, on_iteration: Callable[[], object] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """EM for a full-covariance Gaussian mixture fitted to the aggregate of N diagonal Gaussians N(mu_n, var_n)
    (the training images' posteriors; var None: points): (logits (M,), loc (M, Z), scale_tril (M, Z, Z)).

    Each posterior takes one responsibility per component, scored by E_q[log N(z; μ_k, Σ_k)] =
    log N(mu_n; μ_k, Σ_k) − ½ tr(Σ_k⁻¹ diag var_n), and adds its variance to the covariance it lands in. That
    maximises a lower bound on Σ_n E_q[log p(z)] (one responsibility per posterior, not per sample) with no
    sampling noise to overfit, which a fit to samples of the posteriors would have.
    Means start at distinct seeded posteriors; M = 1 is the moment match. `on_iteration()` after each EM step."""
    mu = mu.float()
    var = torch.zeros_like(mu) if var is None else var.float()
    n, dim = mu.shape
    eye = torch.eye(dim, dtype=mu.dtype)
    cov = torch.cov(mu.T, correction=0) + torch.diag(var.mean(0)) + JITTER * eye
    if components == 1:
        return torch.zeros(1), mu.mean(0, keepdim=True), torch.linalg.cholesky(cov).unsqueeze(0)
    loc = mu[torch.randperm(n, generator=generator)[:components]].clone()
    scale_tril = torch.linalg.cholesky(cov).repeat(components, 1, 1)
    logits = torch.zeros(components, dtype=mu.dtype)
    for _ in range(iterations):
        precision = torch.linalg.solve_triangular(scale_tril, eye, upper=False)    # L⁻¹, (M, Z, Z)
        precision_diag = precision.pow(2).sum(1)                                     # diag of Σ⁻¹, (M, Z)
        resp = torch.cat([torch.softmax(weighted_log_normals(mu[s:s + FIT_ROWS], logits, loc, scale_tril)
                                        - 0.5 * var[s:s + FIT_ROWS] @ precision_diag.T, -1)
                          for s in range(0, n, FIT_ROWS)])                          # (N, M)  E-step
        weight = resp.sum(0) + 1e-12                                                 # M-step
        loc = (resp.T @ mu) / weight[:, None]
        spread = resp.T @ var                                                        # Σ_n r_nk var_n, (M, Z)
        cov = torch.stack([_scatter(mu - loc[k], resp[:, k]) + torch.diag(spread[k])
                           for k in range(components)]) / weight[:, None, None]
        scale_tril = torch.linalg.cholesky(cov + JITTER * eye)
        logits = (weight / n).log()
        if on_iteration is not None:
            on_iteration()
    return logits, loc, scale_tril


def _scatter(centred: Tensor, weight: Tensor) -> Tensor:
    scaled = centred * weight.sqrt()[:, None]
    return scaled.T @ scaled                                                         # Σ_n w_n d_n d_nᵀ
