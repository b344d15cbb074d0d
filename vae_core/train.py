"""Training in one process: the epoch step, evaluation and early stopping that Ray workers reuse too."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .config import TrainConfig
from .losses import elbo_loss
from .models import VAE
from .prior import fit_mixture, log_standard_normal

Batch = tuple[Tensor, Tensor | None]          # (uint8 images (B, C, H, W), int64 labels (B,) or None)


@dataclass
class ImageSet:
    images: Tensor                            # uint8 (N, C, H, W)
    labels: Tensor | None = None              # int64 (N,)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index])


def mean_image(data: ImageSet) -> Tensor:
    """The per-pixel mean in [0, 1]: (C, H, W)."""
    return data.images.mean(0, dtype=torch.float32) / 255.0


def start_output(model: VAE, mean: Tensor, cfg: TrainConfig) -> None:
    """Where the decoder starts (TrainConfig.output_init); a checkpoint or warm start loaded later wins."""
    if cfg.output_init == "mean":
        model.start_at_mean_image(mean)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) positions of a seeded random split: the same seed always holds out the same images,
    whether the set is in memory (split_train_val) or streamed by Ray Data (selected by position)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def split_train_val(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    train_idx, val_idx = split_indices(len(data), val_fraction, seed)
    return data.subset(train_idx), data.subset(val_idx)


def iterate_batches(data: ImageSet, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
    """Mini-batches over an in-memory set; shuffled when a generator is given."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield data.images[idx], None if data.labels is None else data.labels[idx]


def prepare_batch(images: Tensor, cfg: TrainConfig, generator: torch.Generator | None) -> Tensor:
    x = images.float().div_(255.0)                                   # uint8 → [0, 1]
    if cfg.binarize:
        x = torch.bernoulli(x, generator=generator)                   # dynamic binarisation
    return x


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    recon: float
    kl: float
    val_loss: float
    val_recon: float
    val_kl: float
    images_per_s: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sums() -> dict[str, float]:
    return {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0}


def _add(sums: dict[str, float], terms, n: int) -> None:
    sums["loss"] += terms.loss.item() * n
    sums["recon"] += terms.recon.item() * n
    sums["kl"] += terms.kl.item() * n
    sums["n"] += n


def _means(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums["n"], 1)
    return {"loss": sums["loss"] / n, "recon": sums["recon"] / n, "kl": sums["kl"] / n, "n": sums["n"]}


def unwrap(model: torch.nn.Module) -> VAE:
    """The VAE inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def lr_at_epoch(epoch: int, cfg: TrainConfig) -> float:
    """The learning rate for an epoch: constant, or a cosine from lr (epoch 0) to lr/100 (last epoch)."""
    if cfg.lr_schedule == "constant" or cfg.epochs == 1:
        return cfg.lr
    floor = cfg.lr / 100
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * epoch / (cfg.epochs - 1)))


def beta_at_epoch(epoch: int, cfg: TrainConfig) -> float:
    """KL warm-up: β·(epoch+1)/W for the first W epochs, then β."""
    if epoch >= cfg.kl_warmup_epochs:
        return cfg.beta
    return cfg.beta * (epoch + 1) / cfg.kl_warmup_epochs


def start_epoch(optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig) -> float:
    """Apply the epoch's learning rate to the optimizer; return the epoch's KL weight. Both trainers call it."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(epoch, cfg)
    return beta_at_epoch(epoch, cfg)


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], cfg: TrainConfig,
                generator: torch.Generator | None = None, *, beta: float | None = None) -> dict[str, float]:
    """One pass of Adam steps; returns per-image means (loss, recon, kl) and n, the images seen.
    `beta` overrides cfg.beta for this epoch (KL warm-up: see beta_at_epoch). `model` may be wrapped in
    DistributedDataParallel (Ray Train workers): its forward syncs the gradients."""
    beta = cfg.beta if beta is None else beta
    model.train()
    vae = unwrap(model)
    sums = _sums()
    for images, labels in batches:
        x = prepare_batch(images, cfg, generator)
        logits, mu, logvar = model(x, labels, generator)
        terms = elbo_loss(logits, x, mu, logvar, likelihood=vae.cfg.likelihood,
                          log_sigma=vae.log_sigma, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        _add(sums, terms, x.shape[0])
    return _means(sums)


@torch.no_grad()
def evaluate(model: VAE, batches: Iterable[Batch], cfg: TrainConfig, seed: int | None = None) -> dict[str, float]:
    """Per-image means of the (β-weighted) loss, with a fixed seed so that epochs compare fairly."""
    model = unwrap(model)
    model.eval()
    device = next(model.parameters()).device       # a generator must live where the noise is drawn
    generator = torch.Generator(device=device).manual_seed(cfg.seed if seed is None else seed)
    sums = _sums()
    for images, labels in batches:
        x = prepare_batch(images, cfg, generator)
        logits, mu, logvar = model(x, labels, generator)
        terms = elbo_loss(logits, x, mu, logvar, likelihood=model.cfg.likelihood,
                          log_sigma=model.log_sigma, beta=cfg.beta)
        _add(sums, terms, x.shape[0])
    return _means(sums)


@dataclass
class EarlyStopping:
    """Tracks the best validation loss; `step` says whether to stop. Its state is checkpointable."""
    patience: int
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict[str, Tensor] = field(default_factory=dict)

    def step(self, epoch: int, val_loss: float, model: VAE) -> bool:
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch = state["best_loss"], state["best_epoch"]
        self.bad_epochs, self.best_state = state["bad_epochs"], state["best_state"]


@dataclass
class FitResult:
    history: list[EpochMetrics]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


def make_optimizer(model: VAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam. Fused by default: torch's for-loop Adam makes ~10 passes over every weight per step, which on a
    one-thread CPU worker cost 1.7 ms of a 64-image step's ~5 ms (fused: 0.6 ms). Data-parallel workers each pay
    the whole step, so the saving counts twice there."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.adam == "fused")


def epoch_metrics(epoch: int, train: dict, val: dict, seconds: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, loss=train["loss"], recon=train["recon"], kl=train["kl"],
                        val_loss=val["loss"], val_recon=val["recon"], val_kl=val["kl"],
                        images_per_s=train["n"] / max(seconds, 1e-9), seconds=seconds)


def fit(model: VAE, train: ImageSet, val: ImageSet, cfg: TrainConfig,
        on_epoch: Callable[[EpochMetrics], None] | None = None) -> FitResult:
    """Adam on shuffled mini-batches, early stopping on the validation loss (always at the full β), best
    weights restored; the learning rate and KL weight follow lr_at_epoch and beta_at_epoch."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    optimizer = make_optimizer(model, cfg)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    stopper = EarlyStopping(cfg.patience)
    history: list[EpochMetrics] = []
    stopped = False
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        beta = start_epoch(optimizer, epoch, cfg)
        train_means = train_epoch(model, optimizer, iterate_batches(train, cfg.batch_size, shuffle), cfg, shuffle,
                                  beta=beta)
        seconds = time.perf_counter() - start
        val_means = evaluate(model, iterate_batches(val, 1024), cfg)
        metrics = epoch_metrics(epoch, train_means, val_means, seconds)
        history.append(metrics)
        if on_epoch:
            on_epoch(metrics)
        if stopper.step(epoch, metrics.val_loss, model):
            stopped = True
            break
    model.load_state_dict(stopper.best_state)
    return FitResult(history, stopper.best_epoch, stopper.best_loss, stopped)


# Binarised training sees a fresh binarisation of each image every epoch, so its aggregate posterior is the
# average over binarisations: the prior is fitted to this many encodings of each image (one for grey levels,
# whose encoding is deterministic).
PRIOR_BINARISATIONS = 4


@torch.no_grad()
def fit_prior(model: VAE, train: ImageSet, cfg: TrainConfig, held_out: ImageSet | None = None) -> dict[str, float]:
    """Replace the model's N(0, I) by a Gaussian mixture (M = prior_components, per class when conditional)
    fitted to the training images' posteriors q(z | x) (vae_core.prior.fit_mixture). The encoder and decoder
    stay as trained, so the ELBO changes by E_q[log p_fitted(z) − log N(z; 0, I)] alone: returned per image, in
    nats, on the training images and on `held_out` (estimated with one posterior sample per image)."""
    if model.prior is None:
        raise ValueError("this model has no prior to fit (ModelConfig.prior_components is 0)")
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    passes = PRIOR_BINARISATIONS if cfg.binarize else 1
    encodings = [posterior_moments(model, train, cfg, generator) for _ in range(passes)]
    mu, var = (torch.cat(part) for part in zip(*encodings))
    labels = None if train.labels is None else train.labels.repeat(passes)
    groups = [slice(None)] if model.prior.groups == 1 else [labels == g for g in range(model.prior.groups)]
    fits = [fit_mixture(mu[rows], var[rows], model.cfg.prior_components, generator) for rows in groups]
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
