"""What a trained model is used for, as configs: GenerateConfig (`generate`, `reconstruct`), EvalJobConfig and
ClassifierConfig (`evaluate`). Like config.py's, each field that is a flag declares it beside itself, and each
config checks itself; nothing here imports torch, so `vaegen --help` stays quick."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import MAX_SHARDS, StorageConfig, _require, check_finite, flag, section
from .errors import VaegenError
from .names import MODEL_SPEC_HELP, check_model_spec, check_name

MAX_K = 100_000                # importance samples per image (evaluate --k)

KINDS = ("samples", "reconstructions")
FORMATS = ("parquet", "png", "jpeg")
PIXELS = ("sample", "mean")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """`vaegen generate` / `vaegen reconstruct`: one job spec. Everything here (with the model resolved to a
    version and its weights' sha256) is hashed into the job id, so the same spec resumes the same job."""
    model: str = flag("--model", MODEL_SPEC_HELP)
    kind: str = "samples"              # samples (z from the model's prior) | reconstructions (of a dataset split)
    count: int = flag("--count", "number of samples (ids 0..N-1)", default=0)
    dataset: str = flag("--dataset", "reconstructions: the input dataset's name under datasets/", default="")
    split: str = flag("--split", "reconstructions: the input dataset's split", default="test")
    # Reconstructions mirror their input's shards instead.
    shard_size: int = flag("--shard-size", "samples per output shard", default=10_000)
    seed: int = flag("--seed", "random seed of the latents", default=0)
    format: str = flag("--format", "the shards' container and image codec in one: parquet (Parquet, an HF Image "
                       "column of PNGs, zstd), png (WebDataset tar of <id>.png + <id>.json, + <id>.cls when rows "
                       "have a label) or jpeg (the same tar with <id>.jpg: lossy)", default="parquet",
                       choices=FORMATS)
    jpeg_quality: int = flag("--jpeg-quality", "--format jpeg: JPEG quality, 1..100 (95 is img2dataset's default)",
                             default=95)
    labels: tuple[int, ...] = flag("--labels", "conditional models: classes to cycle through the ids", default=(),
                                   unset="every class")
    # Fixed per job, so that a shard's floats do not depend on which worker decodes it.
    decode_batch: int = flag("--decode-batch", "images per decoder call; part of the job spec", default=4096)
    pixels: str = flag("--pixels", "sample: the model's own x ~ p(x | z), pixel noise included for a Gaussian "
                       "model; mean: the decoder's mean image (the same for a Bernoulli model)", default="sample",
                       choices=PIXELS)

    def __post_init__(self) -> None:
        check_model_spec(self.model, "--model")
        check_name(self.split, "--split")
        _require(self.kind in KINDS, f"kind {self.kind!r} must be one of {', '.join(KINDS)}")
        _require(self.format in FORMATS, f"--format={self.format!r} must be one of {', '.join(FORMATS)}")
        _require(self.shard_size > 0, f"--shard-size={self.shard_size} must be > 0")
        _require(self.decode_batch > 0, f"--decode-batch={self.decode_batch} must be > 0")
        _require(self.pixels in PIXELS, f"--pixels={self.pixels!r} must be one of {', '.join(PIXELS)}")
        _require(1 <= self.jpeg_quality <= 100, f"--jpeg-quality={self.jpeg_quality} must be in 1..100")
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


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    # `vaegen evaluate` sets the seed to its own --seed; the other settings are fixed for comparable figures.
    epochs: int = flag("--classifier-epochs", "epochs for the reference and TSTR classifiers", default=5)
    max_images: int = flag("--classifier-max-images", "the reference classifier learns from N of the train split's "
                           "images, evenly spaced over it, and is scored on N of the test split's; 0 = all",
                           default=0, metavar="N")
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite(self)
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise VaegenError(f"classifier settings must be positive: {self}")
        if self.max_images < 0:
            raise VaegenError(f"--classifier-max-images={self.max_images} must be >= 0 (0 = all)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class EvalJobConfig:
    """`vaegen evaluate`: which model version, how hard to look, and where the results go."""
    model: str = flag("--model", MODEL_SPEC_HELP)
    k: int = flag("--k", "importance samples per image", default=1000)
    limit: int = flag("--limit", "likelihood on the first N images only; 0 = the whole split", default=0)
    split: str = flag("--split", "dataset split", default="", unset="test if present, else train")
    seed: int = flag("--seed", "random seed of the binarisation, the importance samples, the generated images "
                     "and the classifiers", default=0)
    # 0 = as many as the reference classifier's real training images, so TSTR and real-data accuracy compare
    # classifiers trained on equal amounts (the usual protocol; fewer samples understate TSTR).
    samples: int = flag("--samples", "generated images for classifier-FID and TSTR; 0 = as many as the real "
                        "training split the reference classifier learnt from", default=0)
    quality: bool = flag("--no-quality", "likelihood only: skip the reference classifier, FID and TSTR",
                         default=True)
    classifier: ClassifierConfig = section("reference classifier", default_factory=ClassifierConfig)
    batch_size: int = flag("--batch-size", "images encoded at once for the IWAE bound", default=100)
    storage: StorageConfig = section("storage", default_factory=StorageConfig)

    def __post_init__(self) -> None:
        check_model_spec(self.model, "--model")
        if self.split:
            check_name(self.split, "--split")
        for name, value, low in (("k", self.k, 1), ("limit", self.limit, 0), ("samples", self.samples, 0),
                                 ("batch-size", self.batch_size, 1)):
            if value < low:
                raise VaegenError(f"--{name}={value} must be >= {low}")
        if self.k > MAX_K:
            raise VaegenError(f"--k={self.k} must be <= {MAX_K:,} (importance samples per image)")
        if self.samples == 1:
            raise VaegenError("--samples=1: a Fréchet distance needs at least 2 samples (0 = as many as the "
                              "real training split)")
