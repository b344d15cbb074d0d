"""How good is a VAE? Likelihood bounds (IWAE, ELBO), a Fréchet distance between feature sets, and TSTR.

Everything is per image in nats and seeded: the same model, data, k and seed give the same figures.
The IWAE bound (Burda et al. 2015) is log (1/k) Σ_i p(x, z_i) / q(z_i | x) with z_i ~ q(z | x): a lower bound
on log p(x) that tightens as k grows; its k=1 expectation is the ELBO."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .artifacts import reconstruction_grid, sample_grid
from .classifier import accuracy, classifier_features, train_classifier
from .config import ModelConfig
from .errors import VaegenError
from .images import decode_png, image_grid, png_bytes, to_uint8
from .losses import LOG_2PI, reconstruction_nll
from .models import VAE
from .plots import loss_curves_png
from .prior import log_standard_normal
from .use_configs import ClassifierConfig

DECODER_ROWS = 4096            # decoder rows per pass: conv activations of 4k images stay ~100 MB

# encode(x) → (μ, log σ²) of q(z | x), each (B, Z); for a conditional model the labels are bound in.
Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]
# log_px_given_z(z, x) → log p(x | z) per row: z (S·B, Z) against x repeated S times (S·B, ...).
DecoderLogLik = Callable[[Tensor, Tensor], Tensor]
# log_prior(z) → log p(z) for z (S, B, Z): (S, B).
LogPrior = Callable[[Tensor], Tensor]


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; μ, diag σ²), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


@torch.no_grad()
def log_weights(encode: Encoder, log_px_given_z: DecoderLogLik, x: Tensor, k: int, generator: torch.Generator,
                chunk: int, log_prior: LogPrior = log_standard_normal) -> Tensor:
    """log p(x, z_i) − log q(z_i | x) for k posterior samples per image: (k, B). x is encoded once and the
    decoder sees `chunk` samples of every image at a time, so memory stays ~chunk·B images."""
    mu, logvar = encode(x)                                                   # (B, Z) each
    std = torch.exp(0.5 * logvar)
    out = []
    for start in range(0, k, chunk):
        s = min(chunk, k - start)
        eps = torch.randn((s, *mu.shape), generator=generator, dtype=mu.dtype)
        z = mu + eps * std                                                   # (s, B, Z)
        x_rep = x.unsqueeze(0).expand(s, *x.shape).reshape(s * x.shape[0], *x.shape[1:])
        log_px = log_px_given_z(z.reshape(-1, z.shape[-1]), x_rep).view(s, -1)          # (s, B)
        out.append(log_px + log_prior(z) - log_normal(z, mu, logvar))
    return torch.cat(out)                                                    # (k, B)


@dataclass
class LikelihoodResult:
    """Per-image means over n images, nats. nll = −IWAE_k bound (an upper bound on −log p(x));
    neg_elbo = −ELBO, estimated from the same k samples (mean of the log weights)."""
    nll: float
    neg_elbo: float
    k: int
    images: int
    seed: int
    seconds: float
    data: str                       # what x was: "dynamically binarised (seed s)" or "continuous in [0, 1]"
    prior: str = "N(0, I)"          # p(z) in the bound: N(0, I) or the model's fitted mixture

    def to_dict(self) -> dict:
        return asdict(self)


def iwae_bounds(encode: Encoder, log_px_given_z: DecoderLogLik, x: Tensor, k: int, *, seed: int = 0,
                batch_size: int = 100, chunk: int = 0, log_prior: LogPrior = log_standard_normal
                ) -> tuple[Tensor, Tensor]:
    """(IWAE_k bound, ELBO estimate) per image, (N,) each, for any encoder / decoder likelihood pair."""
    if k < 1:
        raise VaegenError(f"--k={k} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    chunk = chunk or max(1, min(k, DECODER_ROWS // batch_size))
    iwae, elbo = [], []
    for start in range(0, x.shape[0], batch_size):
        lw = log_weights(encode, log_px_given_z, x[start:start + batch_size], k, generator, chunk, log_prior)
        iwae.append(torch.logsumexp(lw, 0) - math.log(k))
        elbo.append(lw.mean(0))
    return torch.cat(iwae), torch.cat(elbo)


def model_callables(model: VAE, labels: Tensor | None) -> tuple[Encoder, DecoderLogLik, LogPrior]:
    """The generic callables for one of our VAEs on one batch of images (labels are repeated per sample)."""
    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        return model.encode(x, _rows(labels, x))

    def log_px_given_z(z: Tensor, x_rep: Tensor) -> Tensor:
        y = None if labels is None else _rows(labels, x_rep)
        logits = model.decode_logits(z, y)
        return -reconstruction_nll(logits, x_rep, model.cfg.likelihood, model.log_sigma)

    def log_prior(z: Tensor) -> Tensor:
        return model.log_prior(z, labels)                                  # z (S, B, Z): labels are the batch's
    return encode, log_px_given_z, log_prior


def _rows(labels: Tensor | None, x: Tensor) -> Tensor | None:
    """The labels that go with x's rows. x's rows are the batch, or the batch repeated S times."""
    if labels is None:
        return None
    return labels.repeat(x.shape[0] // labels.shape[0])


def likelihood_inputs(images: Tensor, likelihood: str, seed: int) -> tuple[Tensor, str]:
    """uint8 images → what the likelihood is measured on: one seeded binarisation for Bernoulli models
    (the 'dynamically binarised' test set of the literature), grey levels in [0, 1] for Gaussian ones."""
    x = images.float() / 255.0
    if likelihood == "bernoulli":
        return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed)), \
            f"dynamically binarised (seed {seed})"
    return x, "continuous in [0, 1]"


def model_likelihood(model: VAE, images: Tensor, labels: Tensor | None, *, k: int = 1000, seed: int = 0,
                     batch_size: int = 100, progress: Callable[[int], None] | None = None) -> LikelihoodResult:
    """IWAE NLL and −ELBO of a VAE on uint8 images (N, C, H, W); a conditional model gives log p(x | y)."""
    if model.cfg.conditional and labels is None:
        raise VaegenError("a conditional model needs the images' labels for its likelihood")
    model.eval()
    started = time.perf_counter()
    x, data = likelihood_inputs(images, model.cfg.likelihood, seed)
    generator_seed = seed + 1                       # the posterior samples: independent of the binarisation
    iwae, elbo = [], []
    for start in range(0, len(x), batch_size):
        y = None if not model.cfg.conditional else labels[start:start + batch_size]
        encode, log_px, log_prior = model_callables(model, y)
        b_iwae, b_elbo = iwae_bounds(encode, log_px, x[start:start + batch_size], k,
                                     seed=generator_seed + start, batch_size=batch_size, log_prior=log_prior)
        iwae.append(b_iwae)
        elbo.append(b_elbo)
        if progress:
            progress(len(b_iwae))
    return LikelihoodResult(nll=-torch.cat(iwae).mean().item(), neg_elbo=-torch.cat(elbo).mean().item(), k=k,
                            images=len(x), seed=seed, seconds=time.perf_counter() - started, data=data,
                            prior=prior_description(model.cfg))


def prior_description(cfg: ModelConfig) -> str:
    if not cfg.prior_components:
        return "N(0, I)"
    per = " per class" if cfg.conditional else ""
    return f"fitted mixture of {cfg.prior_components} Gaussian{'s' if cfg.prior_components > 1 else ''}{per}"


# -- sample quality ------------------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½) between two feature sets (N, D), as in FID (Heusel et al.).
    Tr((Σa Σb)^½) = Σ √λ(Σa^½ Σb Σa^½): a symmetric PSD matrix, so eigh is stable (no scipy needed)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise VaegenError(f"feature sets must be (N, D) with the same D; got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise VaegenError("a Fréchet distance needs at least 2 feature vectors per set")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum()
    return float(max(value, 0.0))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T


@torch.no_grad()
def generate_labelled(model: VAE, n: int, seed: int, batch_size: int = 1000) -> tuple[Tensor, Tensor | None]:
    """n of the model's samples (z from its prior, x from p(x | z): VAE.sample_images) as uint8 (N, C, H, W);
    a conditional model gets balanced labels (i mod K, then shuffled with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    labels = None
    if model.cfg.conditional:
        labels = (torch.arange(n) % model.cfg.num_classes)[torch.randperm(n, generator=g)]
    out = []
    for start in range(0, n, batch_size):
        y = None if labels is None else labels[start:start + batch_size]
        z = model.sample_prior(min(batch_size, n - start), y, g)
        out.append(model.sample_images(z, y, g).clamp(0, 1).mul(255).round().to(torch.uint8))
    return torch.cat(out), labels


@dataclass
class SampleQuality:
    """Sample quality measured with a reference classifier trained on real data."""
    real_accuracy: float            # reference classifier on the real test images
    classifier_fid: float           # Fréchet distance, real test vs generated, in its penultimate features
    tstr_accuracy: float | None     # classifier trained on generated (conditional) samples, tested on real
    samples: int
    test_images: int
    seed: int
    tstr_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def sample_quality(model: VAE, reference: torch.nn.Module, test_images: Tensor, test_labels: Tensor, *,
                   samples: int = 10_000, seed: int = 0, classifier_cfg: ClassifierConfig | None = None,
                   on_tstr_batch: Callable[[int], object] | None = None) -> SampleQuality:
    """Real-data accuracy of the reference classifier, classifier-FID, and TSTR (conditional models only:
    an unconditional model's samples carry no labels to train on); on_tstr_batch(n) follows TSTR's training."""
    fake, fake_labels = generate_labelled(model, samples, seed)
    real_acc = accuracy(reference, test_images, test_labels)
    fid = frechet_distance(classifier_features(reference, test_images).numpy(),
                           classifier_features(reference, fake).numpy())
    tstr, note = None, "model is unconditional: its samples have no labels to train on"
    if fake_labels is not None:
        cfg = classifier_cfg or ClassifierConfig(seed=seed)
        synthetic_trained = train_classifier(fake, fake_labels, model.cfg.num_classes, cfg, on_tstr_batch)
        tstr, note = accuracy(synthetic_trained, test_images, test_labels), "trained on samples, tested on real"
    return SampleQuality(real_accuracy=real_acc, classifier_fid=fid, tstr_accuracy=tstr, samples=samples,
                         test_images=len(test_images), seed=seed, tstr_note=note)


# -- the picture -----------------------------------------------------------------------------------------

@torch.no_grad()
def latent_traversal(model: VAE, dims: tuple[int, int] = (0, 1), steps: int = 9, span: float = 2.5,
                     label: int = 0) -> np.ndarray:
    """uint8 grid: z = 0 except z[dims[0]] (rows) and z[dims[1]] (columns) over [−span, span]."""
    grid = torch.linspace(-span, span, steps)
    z = torch.zeros(steps * steps, model.cfg.latent_dim)
    d0, d1 = (d % model.cfg.latent_dim for d in dims)
    z[:, d0] = grid.repeat_interleave(steps)
    z[:, d1] = grid.repeat(steps)
    labels = torch.full((len(z),), label) if model.cfg.conditional else None
    return image_grid(to_uint8(model.generate(z, labels)), ncols=steps)


def evaluation_png(model: VAE, images: Tensor, labels: Tensor | None, history: list[dict],
                   title: str) -> bytes:
    """One picture: prior samples (a row per class when conditional), originals above reconstructions, a
    traversal of latent dims 0 and 1, and the loss curves of training."""
    panels = [("samples from the prior" + (" (a row per class)" if model.cfg.conditional else ""),
               decode_png(sample_grid(model))),
              ("originals (odd rows) and reconstructions (even rows)",
               decode_png(reconstruction_grid(model, images, labels if model.cfg.conditional else None))),
              ("latent traversal: z0 down, z1 across, others 0", latent_traversal(model))]
    if history:
        panels.append(("training", decode_png(loss_curves_png(history, title="loss per epoch"))))
    return png_bytes(_stack(title, panels))


def _stack(title: str, panels: list[tuple[str, np.ndarray]], scale: int = 2, pad: int = 8) -> np.ndarray:
    """Panels (C, H, W uint8) one above the other, each under its caption, on white; RGB out."""
    pictures = []
    for caption, arr in panels:
        im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).convert("RGB")
        if im.width < 400:                                         # small grids: enlarge without blurring
            im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        pictures.append((caption, im))
    width = max(im.width for _, im in pictures) + 2 * pad
    height = 24 + sum(im.height + 20 + pad for _, im in pictures)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black")
    y = 24
    for caption, im in pictures:
        draw.text((pad, y + 4), caption, fill="black")
        canvas.paste(im, (pad, y + 20))
        y += im.height + 20 + pad
    return np.asarray(canvas).transpose(2, 0, 1)
