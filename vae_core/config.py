"""One dataclass tree for every job: built by jobs/ from flags, serialised into every model version and
job manifest, re-typed once at each process boundary (Ray workers and actors get plain dicts)."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import VaegenError
from .names import check_name

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
LR_SCHEDULES = ("constant", "cosine")
OUTPUT_INITS = ("mean", "default")
ADAM_IMPLS = ("fused", "for-loop")
PRECISIONS = ("fp32", "bf16")
# Sanity bounds on what one command may ask for. More Ray workers than this is a typo (Ray would wait forever
# for the resources); more output shards than this would not fit the 5-digit part-NNNNN names that keep a
# job's shards in id order when listed.
MAX_WORKERS = 1024
AUTO_WORKERS = "auto"         # --workers auto: sized from the Ray cluster (cluster/runtime/placement.py)
MAX_SHARDS = 100_000
# A dataset's classes are named 0..max label and one-hot encoded into the model: a stray huge label would
# allocate its range before anything else could refuse it.
MAX_CLASSES = 100_000
# Widths of one layer: beyond this a model would not fit any accelerator, and its allocation fails deep in torch.
MAX_MODEL_DIM = 65_536
MAX_PER_WORKER = 1024         # CPUs or GPUs one worker may ask Ray for
IMAGE_MODES = ("L", "RGB")    # ingest --mode
MAX_IMAGE_SIDE = 65_535       # ingest --size: PNG's and PIL's practical bound, and a typo beyond it


def flag(flag: str, help: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
         choices: tuple[str, ...] | None = None, metavar: str | None = None, unset: str | None = None,
         parse: Any = None) -> Any:
    """A dataclass field that is also a command-line flag: its name, help and default are declared here, once,
    and jobs/flags.py turns the field into an argparse argument and the parsed value back into the field.
    A bool field is an on/off flag that sets the opposite of its default (`--no-progress`: progress=False).
    unset: what an empty default (None, "", ()) means, for the help text. parse: text → value, for a value
    written in a form of its own (--size 64x64); its VaegenError is argparse's one-line error."""
    metadata = {"flag": flag, "help": help, "choices": choices, "metavar": metavar, "unset": unset, "parse": parse}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def section(title: str, *, default_factory: Any = dataclasses.MISSING, default: Any = dataclasses.MISSING,
            enabled_by: str | None = None) -> Any:
    """A nested config whose flags are listed under `title`. enabled_by: an optional config (`X | None`) that
    exists only when this field's flag is given (RayTrainConfig only with --workers)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"section": title, "enabled_by": enabled_by})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise VaegenError(message)


def check_finite(cfg: Any) -> None:
    """Every float setting of a config is a finite number: inf and nan pass a `> 0` check (or fail every check
    silently) and would fail deep inside a run, after Ray started. The message names the field's flag."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise VaegenError(f"{f.metadata.get('flag', f.name)}={value} must be a finite number")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = flag("--arch", "architecture: mlp (the reference 784-400-20 design) or conv", default="mlp",
                     choices=ARCHS)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W); None = taken from the dataset
    hidden_dim: int = flag("--hidden-dim", "hidden layer width", default=400)
    latent_dim: int = flag("--latent-dim", "latent size Z", default=20)
    num_classes: int = 0                             # > 0: class-conditional (one-hot into encoder and decoder)
    likelihood: str = flag("--likelihood", "reconstruction term", default="bernoulli", choices=LIKELIHOODS)
    sigma: float = flag("--sigma", "gaussian σ; 0 = learned", default=0.0)
    conv_channels: tuple[int, ...] = (32, 64)        # conv only: one stride-2 layer each
    prior_components: int = flag(
        "--prior-components", "0: sample from N(0, I); M > 0: after training, fit a mixture of M Gaussians (per "
        "class when conditional) to the encoder's posterior and sample from it", default=0, metavar="M")

    def __post_init__(self) -> None:
        check_finite(self)
        _require(self.arch in ARCHS, f"--arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        _require(self.likelihood in LIKELIHOODS,
                 f"--likelihood={self.likelihood!r} must be one of {', '.join(LIKELIHOODS)}")
        _require(self.image_shape is None or len(self.image_shape) == 3 and all(d > 0 for d in self.image_shape),
                 f"image shape {self.image_shape} must be three positive sizes (C, H, W)")
        _require(0 < self.latent_dim <= MAX_MODEL_DIM, f"--latent-dim={self.latent_dim} must be in 1..{MAX_MODEL_DIM}")
        _require(0 < self.hidden_dim <= MAX_MODEL_DIM, f"--hidden-dim={self.hidden_dim} must be in 1..{MAX_MODEL_DIM}")
        _require(all(0 < c <= MAX_MODEL_DIM for c in self.conv_channels),
                 f"conv channels {list(self.conv_channels)} must each be in 1..{MAX_MODEL_DIM}")
        _require(0 <= self.num_classes <= MAX_CLASSES, f"--num-classes={self.num_classes} must be in 0..{MAX_CLASSES:,}")
        _require(self.sigma >= 0, f"--sigma={self.sigma} must be >= 0 (0 = learned)")
        _require(0 <= self.prior_components <= MAX_MODEL_DIM,
                 f"--prior-components={self.prior_components} must be in 0..{MAX_MODEL_DIM}")
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
    epochs: int = flag("--epochs", "training epochs (early stopping may end the run sooner)", default=10)
    batch_size: int = flag("--batch-size", "images per optimiser step (on Ray Train: the global batch)",
                           default=128)
    lr: float = flag("--lr", "Adam learning rate", default=1e-3)
    beta: float = flag("--beta", "weight on the KL term (β-VAE); 1 is the classic ELBO", default=1.0)
    val_fraction: float = flag("--val-fraction", "share of the training split held out for early stopping",
                               default=0.1)
    patience: int = flag("--patience", "early-stopping patience: epochs without a better validation loss",
                         default=3)
    seed: int = flag("--seed", "random seed of the initial weights, the split and the batch order", default=0)
    binarize: bool = flag("--binarize", "dynamic binarisation of the pixels per batch: x ~ Bernoulli(pixel)",
                          default=False)
    max_images: int = flag("--max-images", "train on the first N images only (0 = all)", default=0)
    threads: int = flag("--threads", "torch threads; 0 = torch's default", default=0)
    lr_schedule: str = flag("--lr-schedule", "learning rate per epoch: constant, or cosine from lr down to lr/100",
                            default="constant", choices=LR_SCHEDULES)
    kl_warmup_epochs: int = flag("--kl-warmup-epochs", "ramp the KL weight linearly from β/N up to β over the "
                                 "first N epochs", default=0)
    output_init: str = flag("--output-init", "mean: the decoder starts at the training images' mean image "
                            "(VAE.start_at_mean_image); default: PyTorch's initialisation", default="mean",
                            choices=OUTPUT_INITS)
    adam: str = flag("--adam", "fused: one pass over all the weights per Adam step; for-loop: torch's per-tensor "
                     "loop, the same maths with other rounding, slower on CPU", default="fused", choices=ADAM_IMPLS)
    precision: str = flag("--precision", "fp32, or bf16: the forward pass under bfloat16 autocast (the loss, the "
                          "weights and the evaluation stay fp32)", default="fp32", choices=PRECISIONS)

    def __post_init__(self) -> None:
        check_finite(self)
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
        _require(self.precision in PRECISIONS,
                 f"--precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' (e.g. '64x64') → (H, W); anything else is a one-line VaegenError naming --size."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise VaegenError(f"--size {text!r} is not HxW, e.g. 64x64")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class IngestOptions:
    """How `vaegen ingest` reads its input: from the flags to every reading worker (cluster/data/sources.py),
    and part of the input's fingerprint. Picklable."""
    size: tuple[int, int] | None = flag("--size", "resize every image to HxW: scaled (antialiased: PIL BICUBIC, "
                                        "reducing_gap 3) until it covers HxW, then centre-cropped to it",
                                        default=None, metavar="HxW", parse=parse_size,
                                        unset="as they are; they must share one size")
    mode: str | None = flag("--mode", "L: one grey channel; RGB: three", default=None, choices=IMAGE_MODES,
                            unset="grey stays grey, anything else becomes RGB")
    image_column: str | None = flag("--image-column", "parquet/hf: the image column (encoded bytes, or Hugging "
                                    "Face's Image struct)", default=None, metavar="NAME",
                                    unset="'image', else 'pixels' with height, width, channels")
    label_column: str | None = flag("--label-column", "parquet/hf: the integer label column; '' for none "
                                    "(unlabelled)", default=None, metavar="NAME", unset="'label' if there is one")
    skip_bad: bool = flag("--skip-bad", "skip images that cannot be read (counted and named in the manifest) "
                          "instead of failing on the first", default=False)
    split: str = flag("--split", "the split of input that names none (a folder, a lone file)", default="train")
    image_key: str = flag("--image-key", "webdataset: the image member, the first of these ';'-separated "
                          "extensions that a sample has", default="png;jpg;jpeg", metavar="EXT;EXT")
    label_key: str | None = flag("--label-key", "webdataset: the label member (decimal text, e.g. cls; or json: the "
                                 ".json's 'label'); '' for none (unlabelled)", default=None, metavar="EXT",
                                 unset="cls, when the samples have one")

    def __post_init__(self) -> None:
        if self.size is not None:
            h, w = self.size
            _require(0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE,
                     f"--size {h}x{w}: height and width must be 1..{MAX_IMAGE_SIDE}")
        _require(self.mode in (None, *IMAGE_MODES), f"--mode={self.mode!r} must be one of {', '.join(IMAGE_MODES)}")
        _require(bool(self.image_key.strip(";")), "--image-key names no extension")
        check_name(self.split, "--split")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    root: str = flag("--root", "storage root: a local folder, file://path or s3://bucket/prefix",
                     default="./vaegen-data")
    # pyarrow itself reads neither the flag's variable nor AWS_ENDPOINT_URL: cluster.store.storage passes it on.
    s3_endpoint: str | None = flag("--s3-endpoint", "S3 endpoint URL, e.g. http://127.0.0.1:9000", default=None,
                                   unset="$AWS_ENDPOINT_URL, else AWS")
    # cluster/store/s3.py turns this one number into every S3 timeout and retry deadline.
    s3_timeout_s: float = flag("--s3-timeout", "seconds an S3 request may go unanswered, retries included, before "
                               "the command fails", default=60.0, metavar="S")

    def __post_init__(self) -> None:
        check_finite(self)
        _require(self.s3_timeout_s > 0, f"--s3-timeout={self.s3_timeout_s} must be > 0")


@dataclass(frozen=True, kw_only=True)
class RayTrainConfig:
    """Train data-parallel on Ray Train (TrainJobConfig.ray; None there means one process, no Ray)."""
    workers: str | int = flag("--workers", "train data-parallel on Ray Train with N workers; --batch-size is the "
                              "global batch. auto: one worker per GPU, or per node without GPUs (on this machine: "
                              "one worker with all its CPUs), each with its node's share of CPUs and GPUs",
                              default=2, metavar="N|auto", unset="one process, no Ray")
    gpus_per_worker: float = flag("--gpus-per-worker", "GPUs per worker; 0 = CPU workers with gloo, > 0 = NCCL",
                                  default=0.0, metavar="G")
    cpus_per_worker: float = flag("--cpus-per-worker", "CPUs per worker", default=1.0, metavar="C")
    max_failures: int = flag("--max-failures", "worker-group restarts from the last checkpoint before giving up",
                             default=2, metavar="K")
    checkpoints_to_keep: int = flag("--keep-checkpoints", "checkpoints kept per run", default=2, metavar="K")
    stream_epochs: bool = flag("--stream-epochs", "stream every epoch from storage through Ray Data's shuffle "
                               "buffer instead of keeping each worker's shard in memory (batch order then not "
                               "reproducible)", default=False)
    sync_every: int = flag("--sync-every", "1: all-reduce the gradients every step (exact data-parallel Adam); "
                           "K > 1: each worker steps on its own batches and the workers' weights are averaged "
                           "every K steps (post-local SGD: K times less communication, a slightly different "
                           "optimisation)", default=1, metavar="K")

    def __post_init__(self) -> None:
        check_finite(self)
        if isinstance(self.workers, str) and self.workers != AUTO_WORKERS:
            try:
                object.__setattr__(self, "workers", int(self.workers))
            except ValueError:
                raise VaegenError(f"--workers={self.workers!r} must be a number or {AUTO_WORKERS}") from None
        if self.workers != AUTO_WORKERS:            # auto: sized once the cluster is known
            _require(self.workers >= 1, f"--workers={self.workers} must be >= 1 (omit --workers to train in one "
                                        "process)")
            _require(self.workers <= MAX_WORKERS, f"--workers={self.workers} must be <= {MAX_WORKERS}")
        _require(0 <= self.gpus_per_worker <= MAX_PER_WORKER,
                 f"--gpus-per-worker={self.gpus_per_worker} must be in 0..{MAX_PER_WORKER}")
        _require(0 < self.cpus_per_worker <= MAX_PER_WORKER,
                 f"--cpus-per-worker={self.cpus_per_worker} must be > 0 and <= {MAX_PER_WORKER}")
        _require(self.max_failures >= 0, f"--max-failures={self.max_failures} must be >= 0")
        _require(self.sync_every >= 1, f"--sync-every={self.sync_every} must be >= 1 (1 = every step)")
        _require(self.checkpoints_to_keep >= 1, f"--keep-checkpoints={self.checkpoints_to_keep} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """`vaegen train`: what to train, on which dataset, where the model version lands, and on what backend."""
    model: ModelConfig = section("model", default_factory=ModelConfig)
    train: TrainConfig = section("training", default_factory=TrainConfig)
    storage: StorageConfig = section("storage", default_factory=StorageConfig)
    dataset: str = flag("--dataset", "dataset name under datasets/", default="fashion-mnist")
    name: str = flag("--name", "model name in the registry: models/<name>/v000N/", default="",
                     unset="<dataset>-<model>[-cond]; with --preset its name, <preset>-<dataset> on a dataset "
                     "other than fashion-mnist; a name holds models of one dataset and image shape")
    conditional: bool = flag("--conditional", "condition encoder and decoder on the labels (the number of "
                             "classes comes from the dataset's manifest)", default=False)
    run_id: str = flag("--run-id", "checkpoints go to train-runs/<run-id>/ (every epoch); rerunning the same id "
                       "resumes, and a finished run returns its version", default="", metavar="ID",
                       unset="train: derived from the settings, the dataset's generation and the seed, so the same "
                             "command resumes or returns its version; retrain: a new id")
    # None: train in this process; else data-parallel on Ray Train (cluster.train.driver picks the backend from it).
    ray: RayTrainConfig | None = section("Ray Train (data-parallel)", default=None, enabled_by="workers")

    def __post_init__(self) -> None:
        if not self.name:                               # "" = named after what it trains on and how
            object.__setattr__(self, "name", default_model_name(self.dataset, self.model.arch, self.conditional))
        check_name(self.dataset, "--dataset")
        check_name(self.name, "--name")
        if self.run_id:                                 # "" = an id made by the trainer
            check_name(self.run_id, "--run-id")


def default_model_name(dataset: str, arch: str, conditional: bool) -> str:
    return f"{dataset}-{arch}{'-cond' if conditional else ''}"


@dataclass(frozen=True, kw_only=True)
class RetrainConfig:
    """`vaegen retrain`: the challenger's training job plus the rules of the contest."""
    job: TrainJobConfig = field(default_factory=TrainJobConfig)   # job.name is the model being retrained
    margin: float = flag("--margin", "nats/image the challenger must beat the champion by", default=0.0)
    warm_start: bool = flag("--warm-start", "start the challenger from the champion's weights", default=False)
    eval_split: str = flag("--eval-split", "held-out split to score on", default="test")
    # The seed fixes the posterior samples, so both models are scored on the same draws.
    eval_seed: int = flag("--eval-seed", "seed of the ELBO estimate", default=0)
    eval_max_images: int = flag("--eval-max-images", "score on the first N images; 0 = the whole split", default=0)

    def __post_init__(self) -> None:
        check_finite(self)
        check_name(self.eval_split, "--eval-split")
        if self.margin < 0:
            raise VaegenError(f"--margin={self.margin} must be >= 0")
        if self.eval_max_images < 0:
            raise VaegenError(f"--eval-max-images={self.eval_max_images} must be >= 0")


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
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) > 1 and type(value) in members:          # e.g. workers: str | int ("auto" or a count)
            return value
        hint = members[0]
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
