"""The VAE: encoder → (μ, log σ²), reparameterised z, decoder → pixel logits (sigmoid gives the image).

MLPVAE is the reference design (Kingma & Welling 2013, as in pytorch/examples vae); ConvVAE is a small
strided-conv encoder with a transposed-conv decoder. Both take optional class labels, one-hot, into the
encoder and the decoder (a conditional VAE)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .prior import MixturePrior, log_standard_normal


class VAE(nn.Module):
    """Shared maths; subclasses build `encoder_body` (x → features) and `decoder_body` (z' → logits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.likelihood == "gaussian" and cfg.sigma == 0:
            self.log_sigma = nn.Parameter(torch.zeros(()))   # learned, shared by all pixels
        else:
            self.register_buffer("log_sigma", torch.tensor(math.log(cfg.sigma) if cfg.sigma else 0.0))
        # Training always uses N(0, I); a fitted mixture (vae_core.prior) replaces it for sampling and likelihood.
        self.prior = (MixturePrior(max(cfg.num_classes, 1), cfg.prior_components, cfg.latent_dim)
                      if cfg.prior_components else None)

    def one_hot(self, labels: Tensor | None, device: torch.device) -> Tensor | None:
        if not self.cfg.conditional:
            return None
        if labels is None:
            raise ValueError("this VAE is class-conditional: pass labels")
        return F.one_hot(labels.long(), self.cfg.num_classes).float().to(device)    # (B, K)

    def encode(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.encode_features(x, self.one_hot(labels, x.device))     # (B, hidden)
        mu, logvar = self.to_moments(h).chunk(2, dim=1)                              # each (B, Z)
        return mu, logvar.clamp(-30.0, 20.0)                                         # keep exp() finite

    def decode_logits(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        logits = self.decode_features(z, self.one_hot(labels, z.device))
        return logits.view(z.shape[0], *self.cfg.image_shape)                       # (B, C, H, W)

    @torch.no_grad()
    def start_at_mean_image(self, mean_image: Tensor) -> None:
        """Data-dependent start: the decoder's output bias at the log-odds of the training images' mean
        (C, H, W) in [0, 1], so the first steps learn the images' structure rather than their average (Burda et
        al. 2016 start their decoders the same way). The subclass sets what its output layer can hold."""
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)                                   # z = μ + σ·ε

    def forward(self, x: Tensor, labels: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x, labels)
        z = self.reparameterize(mu, logvar, generator)
        return self.decode_logits(z, labels), mu, logvar

    def sample_prior(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """n latents (n, Z) from p(z | y); for N(0, I) exactly torch.randn(n, Z, generator)."""
        if self.prior is None:
            return torch.randn(n, self.cfg.latent_dim, generator=generator)
        return self.prior.sample(n, labels, generator)              # one group unless conditional

    def log_prior(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(z | y) for z (..., B, Z) and labels (B,): (..., B)."""
        if self.prior is None:
            return log_standard_normal(z)
        return self.prior.log_prob(z, labels)

    @torch.inference_mode()
    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Decoder mean images in [0, 1], (B, C, H, W)."""
        return torch.sigmoid(self.decode_logits(z, labels))

    @torch.inference_mode()
    def sample_images(self, z: Tensor, labels: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """The model's own samples x ~ p(x | z) in [0, 1]: a Gaussian model adds its pixel noise σ·ε (clipped);
        a Bernoulli model gives its mean, since a Bernoulli draw would binarise grey-level images."""
        mean = self.generate(z, labels)
        if self.cfg.likelihood == "bernoulli":
            return mean
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + eps * torch.exp(self.log_sigma)).clamp_(0.0, 1.0)

    @torch.inference_mode()
    def reconstruct(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(images decoded from the posterior mean, the posterior mean μ)."""
        mu, _ = self.encode(x, labels)
        return torch.sigmoid(self.decode_logits(mu, labels)), mu


class MLPVAE(VAE):
    """flatten → Dense(hidden, ReLU) → (μ, log σ²); z → Dense(hidden, ReLU) → Dense(D) → sigmoid."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        k, d, h, z = cfg.num_classes, cfg.pixels, cfg.hidden_dim, cfg.latent_dim
        self.enc = nn.Linear(d + k, h)
        self.to_moments = nn.Linear(h, 2 * z)
        self.dec_hidden = nn.Linear(z + k, h)
        self.dec_out = nn.Linear(h, d)

    def encode_features(self, x: Tensor, y: Tensor | None) -> Tensor:
        x = x.flatten(1)                                                             # (B, D)
        return F.relu(self.enc(x if y is None else torch.cat([x, y], 1)))

    def decode_features(self, z: Tensor, y: Tensor | None) -> Tensor:
        h = F.relu(self.dec_hidden(z if y is None else torch.cat([z, y], 1)))
        return self.dec_out(h)                                                       # (B, D) logits

    @torch.no_grad()
    def start_at_mean_image(self, mean_image: Tensor) -> None:
        """A bias per pixel: a dense output layer can start at each pixel's own mean level."""
        self.dec_out.bias.copy_(_log_odds(mean_image.flatten()))


class ConvVAE(VAE):
    """Stride-2 convs (H → H/2^L), a dense bottleneck, and the mirror image in transposed convs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        c, hgt, wid = cfg.image_shape
        chans = (c, *cfg.conv_channels)
        scale = 2 ** len(cfg.conv_channels)
        self.feature_shape = (chans[-1], hgt // scale, wid // scale)                 # (C_L, H/2^L, W/2^L)
        flat = math.prod(self.feature_shape)
        k, h, z = cfg.num_classes, cfg.hidden_dim, cfg.latent_dim
        self.convs = nn.Sequential(*[
            layer for cin, cout in zip(chans, chans[1:])
            for layer in (nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU())])
        self.enc = nn.Linear(flat + k, h)
        self.to_moments = nn.Linear(h, 2 * z)
        self.dec_hidden = nn.Sequential(nn.Linear(z + k, h), nn.ReLU(), nn.Linear(h, flat), nn.ReLU())
        rev = chans[::-1]
        deconvs: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(rev, rev[1:])):
            deconvs.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if i < len(rev) - 2:
                deconvs.append(nn.ReLU())                                            # last layer: logits
        self.deconvs = nn.Sequential(*deconvs)

    def encode_features(self, x: Tensor, y: Tensor | None) -> Tensor:
        h = self.convs(x).flatten(1)                                                 # (B, C_L·H'·W')
        return F.relu(self.enc(h if y is None else torch.cat([h, y], 1)))

    def decode_features(self, z: Tensor, y: Tensor | None) -> Tensor:
        h = self.dec_hidden(z if y is None else torch.cat([z, y], 1))
        return self.deconvs(h.view(z.shape[0], *self.feature_shape))                 # (B, C, H, W) logits

    @torch.no_grad()
    def start_at_mean_image(self, mean_image: Tensor) -> None:
        """A transposed conv has one bias per channel: the channel's mean level (weights as initialised)."""
        self.deconvs[-1].bias.copy_(_log_odds(mean_image.mean((1, 2))))


def _log_odds(p: Tensor) -> Tensor:
    p = p.float().clamp(1e-3, 1 - 1e-3)                                              # never-lit pixels: −6.9
    return torch.log(p) - torch.log1p(-p)


def build_model(cfg: ModelConfig) -> VAE:
    if cfg.image_shape is None:
        raise ValueError("ModelConfig.image_shape is unset: bind the config to a dataset first")
    return {"mlp": MLPVAE, "conv": ConvVAE}[cfg.arch](cfg)
