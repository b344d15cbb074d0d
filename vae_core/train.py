"""The training maths and the one epoch loop: the single-process trainer and every Ray Train worker run
run_epochs, with their own batches and ways to combine figures across workers (EpochHooks)."""
from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .config import TrainConfig
from .errors import VaegenError
from .losses import elbo_loss
from .models import VAE

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
    """(train, val) positions of a seeded random split of n rows: the same seed always holds out the same rows."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def split_train_val(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Both parts keep the set's row order: a data-parallel worker that sorts its rows by id then holds
    exactly what one process holds (and shuffles it the same way)."""
    train_idx, val_idx = split_indices(len(data), val_fraction, seed)
    return data.subset(train_idx.sort().values), data.subset(val_idx.sort().values)


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
    """Apply the epoch's learning rate to the optimizer; return the epoch's KL weight (run_epochs calls it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at_epoch(epoch, cfg)
    return beta_at_epoch(epoch, cfg)


def forward_precision(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """--precision bf16: the forward pass under bfloat16 autocast (CPU and CUDA alike); weights, gradients and
    Adam's moments stay fp32, and bf16 keeps fp32's exponent range, so no loss scaling is needed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def train_epoch(model: VAE, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], cfg: TrainConfig,
                generator: torch.Generator | None = None, *, beta: float | None = None,
                on_batch: Callable[[int], object] | None = None) -> dict[str, float]:
    """One pass of Adam steps; returns per-image means (loss, recon, kl) and n, the images seen; on_batch(n)
    after each step of n images (progress).
    `beta` overrides cfg.beta for this epoch (KL warm-up: see beta_at_epoch). `model` may be wrapped in
    DistributedDataParallel (Ray Train workers): its forward syncs the gradients."""
    beta = cfg.beta if beta is None else beta
    model.train()
    vae = unwrap(model)
    device = next(vae.parameters()).device
    sums = _sums()
    for images, labels in batches:
        x = prepare_batch(images.to(device, non_blocking=True), cfg, generator)   # no copy when resident there
        with forward_precision(cfg, device):
            logits, mu, logvar = model(x, labels, generator)
        # The loss in fp32 whatever the forward's precision: bf16's 8-bit mantissa would round a sum over an
        # image's pixels by about a nat.
        terms = elbo_loss(logits.float(), x, mu.float(), logvar.float(), likelihood=vae.cfg.likelihood,
                          log_sigma=vae.log_sigma, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        _add(sums, terms, x.shape[0])
        if on_batch is not None:
            on_batch(x.shape[0])
    return _means(sums)


@torch.no_grad()
def evaluate(model: VAE, batches: Iterable[Batch], cfg: TrainConfig, seed: int | None = None) -> dict[str, float]:
    """Per-image means of the (β-weighted) loss, with a fixed seed so that epochs compare fairly. Always fp32,
    whatever cfg.precision: early stopping and the reported losses then measure the weights a run trained, and
    runs at either precision compare on one scale (a forward pass without a backward costs little)."""
    model = unwrap(model)
    model.eval()
    device = next(model.parameters()).device       # a generator must live where the noise is drawn
    generator = torch.Generator(device=device).manual_seed(cfg.seed if seed is None else seed)
    sums = _sums()
    for images, labels in batches:
        x = prepare_batch(images.to(device, non_blocking=True), cfg, generator)
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
    starts: list[dict] = field(default_factory=list)   # {"epoch", "first_batch_at"} per start of the run

    @classmethod
    def of_checkpoint(cls, saved: dict) -> "FitResult":
        return cls([EpochMetrics(**m) for m in saved["history"]], saved["stopper"]["best_epoch"],
                   saved["stopper"]["best_loss"], saved["stopped_early"], saved["starts"])


def make_optimizer(model: VAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam; fused by default (one pass over all the weights per step instead of several per tensor: a
    data-parallel worker pays the whole step, so this counts on every worker)."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.adam == "fused")


def epoch_metrics(epoch: int, train: dict, val: dict, seconds: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, loss=train["loss"], recon=train["recon"], kl=train["kl"],
                        val_loss=val["loss"], val_recon=val["recon"], val_kl=val["kl"],
                        images_per_s=train["n"] / max(seconds, 1e-9), seconds=seconds)


# -- randomness: keyed by (seed, epoch, rank) --------------------------------------------------------------
# Every random draw of training comes from generators made afresh for each epoch and worker, never from a
# state carried across epochs: the epoch number in a checkpoint is then the whole RNG position (a resumed run
# draws what an uninterrupted one would), and one worker of a data-parallel run draws what one process does.
RNG_SCHEME = "seed-epoch-rank-v1"
SHUFFLE_STREAM, NOISE_STREAM = 0, 1


def rng_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1009 + rank) * 7 + stream) % 2**63


def epoch_generators(seed: int, epoch: int, rank: int,
                     device: torch.device | str = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """(shuffle, noise): the batch order (on the CPU, where indices are drawn) and the binarisation and
    reparameterisation noise (on the model's device, where it is drawn)."""
    shuffle = torch.Generator().manual_seed(rng_seed(seed, epoch, rank, SHUFFLE_STREAM))
    noise = torch.Generator(device=device).manual_seed(rng_seed(seed, epoch, rank, NOISE_STREAM))
    return shuffle, noise


# -- the epoch loop ------------------------------------------------------------------------------------------
def _same(means: dict) -> dict:
    return means


def _nothing() -> None:
    return None


@dataclass
class EpochHooks:
    """What a trainer supplies to the epoch loop. The single-process trainer gives its in-memory batches and
    keeps the defaults; a data-parallel worker gives its own share of each epoch's batches, combines its figures
    with the other workers' (all-reduce), and may average weights after the epoch's steps."""
    train_batches: Callable[[int, torch.Generator], Iterable[Batch]]   # (epoch, shuffle generator) → batches
    val_batches: Callable[[], Iterable[Batch]]
    rank: int = 0
    device: torch.device | str = "cpu"
    combine_train: Callable[[dict], dict] = _same      # this worker's per-image means → everyone's
    combine_val: Callable[[dict], dict] = _same        # → the figures every worker takes its stop decision on
    after_train: Callable[[], None] = _nothing         # e.g. post-local SGD's end-of-epoch weight average
    on_batch: Callable[[int, int], object] | None = None   # (epoch, images in the step): progress within an epoch


@dataclass
class TrainingState:
    """Everything the loop carries from epoch to epoch besides the model and optimizer (checkpointed)."""
    stopper: EarlyStopping
    history: list[EpochMetrics] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def next_epoch(self) -> int:
        return len(self.history)


def run_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, hooks: EpochHooks,
               state: TrainingState,
               on_epoch: Callable[[EpochMetrics, TrainingState], None] | None = None) -> TrainingState:
    """The one epoch loop of every trainer: set the epoch's lr and β → train → evaluate (at the full β) →
    record → early stop, from state.next_epoch to cfg.epochs. `model` may be DDP-wrapped; `on_epoch` runs
    after each epoch is recorded (progress, checkpoints)."""
    state.starts.append({"epoch": state.next_epoch, "first_batch_at": 0.0})
    for epoch in range(state.next_epoch, 0 if state.stopped_early else cfg.epochs):
        shuffle, noise = epoch_generators(cfg.seed, epoch, hooks.rank, hooks.device)
        begin = time.perf_counter()
        beta = start_epoch(optimizer, epoch, cfg)
        batches = _noting_first_batch(hooks.train_batches(epoch, shuffle), state.starts[-1])
        steps = None if hooks.on_batch is None else functools.partial(hooks.on_batch, epoch)
        train_means = hooks.combine_train(train_epoch(model, optimizer, batches, cfg, noise, beta=beta,
                                                      on_batch=steps))
        hooks.after_train()
        seconds = time.perf_counter() - begin
        val_means = hooks.combine_val(evaluate(model, hooks.val_batches(), cfg))
        metrics = epoch_metrics(epoch, train_means, val_means, seconds)
        state.history.append(metrics)
        state.stopped_early = state.stopper.step(epoch, metrics.val_loss, unwrap(model))
        if on_epoch:
            on_epoch(metrics, state)
        if state.stopped_early:
            break
    return state


def _noting_first_batch(batches: Iterable[Batch], start: dict) -> Iterator[Batch]:
    """Note when a start's first batch arrives: the start-up a user waits through."""
    for b in batches:
        if not start["first_batch_at"]:
            start["first_batch_at"] = time.time()
        yield b


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainingState) -> dict:
    """A checkpoint as plain tensors, numbers and lists (torch.load(weights_only=True) reads it back)."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "stopper": state.stopper.state_dict(), "history": [m.to_dict() for m in state.history],
            "starts": state.starts, "stopped_early": state.stopped_early,
            "rng": {"scheme": RNG_SCHEME, "next_epoch": state.next_epoch}}


def resume(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> TrainingState:
    """Load a checkpoint_state into the model and optimizer; the loop state to continue from."""
    scheme = saved.get("rng", {}).get("scheme")
    if scheme != RNG_SCHEME:
        raise VaegenError(f"this checkpoint draws its random numbers by another scheme ({scheme or 'unrecorded'}, "
                          f"not {RNG_SCHEME}): it cannot be resumed; use a new --run-id")
    unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    stopper = EarlyStopping(cfg.patience)
    stopper.load_state_dict(saved["stopper"])
    return TrainingState(stopper, [EpochMetrics(**m) for m in saved["history"]], list(saved["starts"]),
                         saved["stopped_early"])


EVAL_BATCH = 1024


def require_a_best_epoch(best_epoch: int, history: list[EpochMetrics], cfg: TrainConfig, val_images: int,
                         train_images: int) -> None:
    """A run whose every validation loss was inf or nan has no weights worth publishing (and no best state to
    restore): a one-line VaegenError naming the likely causes instead."""
    if best_epoch >= 0:
        return
    last = history[-1].val_loss if history else float("nan")
    raise VaegenError(f"training found no finite validation loss in {len(history)} epoch(s) (last: {last}): "
                      f"the learning rate --lr={cfg.lr:g} is likely too high, or there is too little data "
                      f"({train_images} training and {val_images} validation image(s)); nothing was published")


def fit(model: VAE, train: ImageSet, val: ImageSet, cfg: TrainConfig,
        on_epoch: Callable[[EpochMetrics], None] | None = None, *, checkpoint: dict | None = None,
        save: Callable[[dict], None] | None = None, on_batch: Callable[[int, int], object] | None = None
        ) -> FitResult:
    """Train in this process: Adam on shuffled mini-batches, early stopping on the validation loss, best weights
    restored. `checkpoint` (a checkpoint_state) resumes a run; `save` receives one after every epoch;
    on_batch(epoch, n) follows the steps."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    optimizer = make_optimizer(model, cfg)
    state = (resume(checkpoint, model, optimizer, cfg) if checkpoint is not None
             else TrainingState(EarlyStopping(cfg.patience)))
    hooks = EpochHooks(train_batches=lambda epoch, shuffle: iterate_batches(train, cfg.batch_size, shuffle),
                       val_batches=lambda: iterate_batches(val, EVAL_BATCH), device=next(model.parameters()).device,
                       on_batch=on_batch)

    def record(metrics: EpochMetrics, state: TrainingState) -> None:
        if on_epoch:
            on_epoch(metrics)
        if save:
            save(checkpoint_state(model, optimizer, state))
    run_epochs(model, optimizer, cfg, hooks, state, record)
    require_a_best_epoch(state.stopper.best_epoch, state.history, cfg, len(val), len(train))
    model.load_state_dict(state.stopper.best_state)
    return FitResult(state.history, state.stopper.best_epoch, state.stopper.best_loss, state.stopped_early,
                     state.starts)
