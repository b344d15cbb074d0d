"""One dataclass tree for every job: built by jobs/ from flags, serialised into every model version and
job manifest, re-typed once at each process boundary (Ray workers and actors get plain dicts)."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import VaegenError
from .names import check_model_spec, check_name

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
LR_SCHEDULES = ("constant", "cosine")
OUTPUT_INITS = ("mean", "default")
ADAM_IMPLS = ("fused", "for-loop")
# Sanity bounds on what one command may ask for. More Ray workers than this is a typo (Ray would wait forever
# for the resources); more output shards than this would not fit the 5-digit part-NNNNN names that keep a
# job's shards in id order when listed.
MAX_WORKERS = 1024
MAX_SHARDS = 100_000


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise VaegenError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = "mlp"                                # mlp (the reference design) | conv
    image_shape: tuple[int, int, int] | None = None  # (C, H, W); None = taken from the dataset
    hidden_dim: int = 400
    latent_dim: int = 20
    num_classes: int = 0                             # > 0: class-conditional (one-hot into encoder and decoder)
    likelihood: str = "bernoulli"                    # bernoulli | gaussian
    sigma: float = 0.0                               # gaussian only: fixed σ; 0 means learned
    conv_channels: tuple[int, ...] = (32, 64)        # conv only: one stride-2 layer each
    prior_components: int = 0                        # 0: p(z) = N(0, I); M > 0: after training, a mixture of M
                                                     # Gaussians fitted to the aggregate posterior (per class)

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, f"--model={self.arch!r} must be one of {', '.join(ARCHS)}")
        _require(self.likelihood in LIKELIHOODS,
                 f"--likelihood={self.likelihood!r} must be one of {', '.join(LIKELIHOODS)}")
        _require(self.image_shape is None or len(self.image_shape) == 3 and all(d > 0 for d in self.image_shape),
                 f"image shape {self.image_shape} must be three positive sizes (C, H, W)")
        _require(self.latent_dim > 0, f"--latent-dim={self.latent_dim} must be > 0")
        _require(self.hidden_dim > 0, f"--hidden-dim={self.hidden_dim} must be > 0")
        _require(self.num_classes >= 0, f"--num-classes={self.num_classes} must be >= 0")
        _require(self.sigma >= 0, f"--sigma={self.sigma} must be >= 0 (0 = learned)")
        _require(self.prior_components >= 0, f"--prior-components={self.prior_components} must be >= 0")
        if self.arch == "conv" and self.image_shape is not None:
            stride = 2 ** len(self.conv_channels)
            _, h, w = self.image_shape
            _require(h % stride == 0 and w % stride == 0,
                     f"conv VAE with {len(self.conv_channels)} stride-2 layers needs H and W divisible by "
                     f"{stride}; got {h}x{w}")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def pixels(self) -> int:
        if self.image_shape is None:
            raise ValueError("ModelConfig.image_shape is unset: bind the config to a dataset first")
        c, h, w = self.image_shape
        return c * h * w


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0                  # weight on KL (β-VAE); 1 is the classic ELBO
    val_fraction: float = 0.1          # held out of the training split for early stopping
    patience: int = 3                  # epochs without a better val loss before stopping
    seed: int = 0
    binarize: bool = False             # dynamic binarisation: x ~ Bernoulli(pixel) per batch
    max_images: int = 0                # use only the first N training images (0 = all)
    threads: int = 0                   # torch threads (0 = torch's default)
    lr_schedule: str = "constant"      # constant | cosine (per epoch, from lr down to lr/100)
    kl_warmup_epochs: int = 0          # KL weight ramps linearly from β/W to β over the first W epochs
    output_init: str = "mean"          # mean: the decoder starts out drawing the training images' mean image
                                       # (VAE.start_at_mean_image); default: PyTorch's own initialisation
    adam: str = "fused"                # fused: one pass over all the weights per step; for-loop: torch's per-tensor
                                       # loop (the same maths, other rounding, slower on CPU)

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"--epochs={self.epochs} must be > 0")
        _require(self.batch_size > 0, f"--batch-size={self.batch_size} must be > 0")
        _require(self.lr > 0, f"--lr={self.lr} must be > 0")
        _require(self.beta >= 0, f"--beta={self.beta} must be >= 0")
        _require(0 < self.val_fraction < 1, f"--val-fraction={self.val_fraction} must be in (0, 1)")
        _require(self.patience > 0, f"--patience={self.patience} must be > 0")
        _require(self.max_images >= 0, f"--max-images={self.max_images} must be >= 0")
        _require(self.threads >= 0, f"--threads={self.threads} must be >= 0")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"--lr-schedule={self.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}")
        _require(self.kl_warmup_epochs >= 0, f"--kl-warmup-epochs={self.kl_warmup_epochs} must be >= 0")
        _require(self.output_init in OUTPUT_INITS,
                 f"--output-init={self.output_init!r} must be one of {', '.join(OUTPUT_INITS)}")
        _require(self.adam in ADAM_IMPLS, f"--adam={self.adam!r} must be one of {', '.join(ADAM_IMPLS)}")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    root: str = "./vaegen-data"        # local folder, file://, or s3://bucket/prefix
    s3_endpoint: str | None = None     # else AWS_ENDPOINT_URL; pyarrow itself reads neither


@dataclass(frozen=True, kw_only=True)
class RayTrainConfig:
    """Train data-parallel on Ray Train (TrainJobConfig.ray; None there means one process, no Ray)."""
    workers: int = 2                   # data-parallel workers; the global batch (--batch-size) is split across them
    gpus_per_worker: float = 0.0       # 0 = CPU workers with gloo; > 0 = GPU workers with NCCL
    cpus_per_worker: float = 1.0
    max_failures: int = 2              # worker-group restarts (from the last checkpoint) before the run fails
    checkpoints_to_keep: int = 2
    cache_shards: bool = True          # each worker holds its rows in memory; False = stream every epoch through
                                       # Ray Data's shuffle buffer (batch order then not reproducible)
    sync_every: int = 1                # 1 = all-reduce gradients every step; K > 1 = average weights every K steps

    def __post_init__(self) -> None:
        _require(self.workers >= 1, f"--workers={self.workers} must be >= 1 (omit --workers to train in one process)")
        _require(self.workers <= MAX_WORKERS, f"--workers={self.workers} must be <= {MAX_WORKERS}")
        _require(self.gpus_per_worker >= 0, f"--gpus-per-worker={self.gpus_per_worker} must be >= 0")
        _require(self.cpus_per_worker > 0, f"--cpus-per-worker={self.cpus_per_worker} must be > 0")
        _require(self.max_failures >= 0, f"--max-failures={self.max_failures} must be >= 0")
        _require(self.sync_every >= 1, f"--sync-every={self.sync_every} must be >= 1 (1 = every step)")
        _require(self.checkpoints_to_keep >= 1, f"--keep-checkpoints={self.checkpoints_to_keep} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """`vaegen train`: what to train, on which dataset, where the model version lands, and on what backend."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    dataset: str = "fashion-mnist"
    name: str = "fashion-mnist-mlp"    # model name in the registry: models/<name>/v000N/
    conditional: bool = False          # condition on the dataset's labels (num_classes from its manifest)
    run_id: str = ""                   # train-runs/<run-id>/ on the storage root; "" = a new id; same id = resume
    ray: RayTrainConfig | None = None  # None: train in this process; else data-parallel on Ray Train

    def __post_init__(self) -> None:
        check_name(self.dataset, "--dataset")
        check_name(self.name, "--name")
        if self.run_id:                                 # "" = a new id, made by the trainer
            check_name(self.run_id, "--run-id")


KINDS = ("samples", "reconstructions")
FORMATS = ("parquet", "png")
PIXELS = ("sample", "mean")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """`vaegen generate` / `vaegen reconstruct`: one job spec. Everything here (with the model resolved to a
    version and its weights' sha256) is hashed into the job id, so the same spec resumes the same job."""
    model: str                         # registry spec: name[@vN|@latest|@champion]
    kind: str = "samples"              # samples (z from the model's prior) | reconstructions (of a dataset split)
    count: int = 0                     # samples: how many (ids 0..count-1)
    dataset: str = ""                  # reconstructions: input dataset name under datasets/
    split: str = "test"                # reconstructions: its split
    shard_size: int = 10_000           # samples per output shard (reconstructions mirror the input shards)
    seed: int = 0
    format: str = "parquet"            # parquet (raw pixels) | png (WebDataset tar of <id>.png + <id>.json)
    labels: tuple[int, ...] = ()       # conditional models: classes cycled over ids; () = every class
    decode_batch: int = 4096           # fixed, so a shard's floats do not depend on who decodes it
    pixels: str = "sample"             # samples: x ~ p(x | z) (a Gaussian model's pixel noise included) | "mean"

    def __post_init__(self) -> None:
        check_model_spec(self.model, "--model")
        check_name(self.split, "--split")
        _require(self.kind in KINDS, f"kind {self.kind!r} must be one of {', '.join(KINDS)}")
        _require(self.format in FORMATS, f"--format={self.format!r} must be one of {', '.join(FORMATS)}")
        _require(self.shard_size > 0, f"--shard-size={self.shard_size} must be > 0")
        _require(self.decode_batch > 0, f"--decode-batch={self.decode_batch} must be > 0")
        _require(self.pixels in PIXELS, f"--pixels={self.pixels!r} must be one of {', '.join(PIXELS)}")
        _require(self.kind == "samples" or self.pixels == "sample",
                 "--pixels applies to samples; reconstructions are always the decoder's mean")
        _require(all(label >= 0 for label in self.labels), f"--labels={list(self.labels)} must be >= 0")
        if self.kind == "samples":
            _require(self.count > 0, f"--count={self.count} must be > 0")
            _require(-(-self.count // self.shard_size) <= MAX_SHARDS,
                     f"--count={self.count} in shards of --shard-size={self.shard_size} makes "
                     f"{-(-self.count // self.shard_size):,} shards; at most {MAX_SHARDS:,} (raise --shard-size)")
            _require(not self.dataset, "samples take --count, not --dataset (use `vaegen reconstruct`)")
        else:
            _require(bool(self.dataset), "reconstructions need --dataset")
            check_name(self.dataset, "--dataset")
            _require(self.count == 0, "reconstructions cover the whole --split: drop --count")
            _require(not self.labels, "reconstructions use the dataset's labels: drop --labels")


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """Re-type a dict made by to_dict (or read from JSON/TOML); unknown keys are refused by name."""
    if not isinstance(raw, dict):
        raise VaegenError(f"{cls.__name__} expects a table of settings, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise VaegenError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            return from_dict(hint, value)
        origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise VaegenError(f"{where} must be a list, got {value!r}")
        return tuple(int(v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise VaegenError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
