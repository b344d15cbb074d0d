"""A generation job's identity and plan: everything resolved and checked before any work starts.

The job id hashes the spec with the model resolved to a version, its weights' sha256, its config.json's sha256,
the input shards' sha256 and the class names: the same spec resumes the same job under outputs/<job-id>/, and a
model edited in place is a new job. The plan says, for any shard index, which rows it holds; it travels to the
workers as a plain dict (JobPlan.to_dict / from_dict)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from cluster.data.datasets import read_manifest, split_shards
from cluster.generate.writers import PARQUET_MAX_IMAGE_BYTES, image_encoder, parquet_image_bytes
from cluster.store.layout import (
    OUTPUT_FORMAT_VERSION,
    JobKeys,
    dataset_manifest_key,
    job_id,
    job_prefix,
    job_split,
    shard_name,
)
from cluster.store.records import sha256_hex
from cluster.store.registry import LoadedModel, ModelRef, Registry
from cluster.store.storage import Storage
from vae_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from vae_core.config import MAX_SHARDS, from_dict, to_dict
from vae_core.errors import VaegenError
from vae_core.names import is_valid_name
from vae_core.use_configs import GenerateConfig


@dataclass(frozen=True)
class ShardTask:
    index: int
    first_id: int
    rows: int
    input: dict | None = None           # reconstructions: the input shard's manifest entry (name, sha256, ...)


@dataclass(frozen=True)
class JobPlan:
    """Everything a worker needs to build any shard of the job."""
    job_id: str
    spec: GenerateConfig
    model_ref: str                      # name@v0001
    weights_sha256: str
    config_sha256: str                  # of the version's config.json bytes
    image_shape: tuple[int, int, int]
    labels: tuple[int, ...]             # samples of a conditional model: classes cycled over ids
    total_rows: int
    num_shards: int
    input_shards: tuple[dict, ...] = ()  # reconstructions
    label_names: tuple[str, ...] = ()   # class names (from the input or the model's training dataset)

    @property
    def prefix(self) -> str:
        return job_prefix(self.job_id)

    @property
    def keys(self) -> JobKeys:
        return JobKeys(self.prefix)

    @property
    def split(self) -> str:
        return job_split(self.spec.kind, self.spec.split)

    def shard_name(self, index: int) -> str:
        return shard_name(index, self.spec.format, self.num_shards, self.split)

    def shard_key(self, index: int) -> str:
        return self.keys.shard(self.shard_name(index))

    def receipt_key(self, index: int) -> str:
        return self.keys.receipt(self.shard_name(index))

    def task(self, index: int) -> ShardTask:
        if self.input_shards:
            entry = self.input_shards[index]
            return ShardTask(index, entry["first_id"], entry["rows"], entry)
        first = index * self.spec.shard_size
        return ShardTask(index, first, min(self.spec.shard_size, self.total_rows - first))

    def to_dict(self) -> dict:
        """JSON-ready: what crosses a process boundary (config.py's rule: actors get plain dicts)."""
        return {**dataclasses.asdict(self), "spec": to_dict(self.spec), "image_shape": list(self.image_shape),
                "labels": list(self.labels), "input_shards": [dict(s) for s in self.input_shards],
                "label_names": list(self.label_names)}

    @classmethod
    def from_dict(cls, raw: dict) -> "JobPlan":
        return cls(**{**raw, "spec": from_dict(GenerateConfig, raw["spec"]),
                      "image_shape": tuple(raw["image_shape"]), "labels": tuple(raw["labels"]),
                      "input_shards": tuple(raw["input_shards"]), "label_names": tuple(raw["label_names"])})


def load_model(storage: Storage, spec: str | ModelRef) -> tuple[LoadedModel, str]:
    """The model and the sha256 of the config.json bytes it was built from (read once: the hash and the model
    cannot come from two different versions of the file)."""
    registry = Registry(storage)
    ref = spec if isinstance(spec, ModelRef) else registry.resolve(spec)
    files = {name: registry.read_file(ref, name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    try:
        model, config = load_checkpoint(files)
    except VaegenError as e:
        raise VaegenError(f"{ref}: {e}") from None
    return LoadedModel(ref, model, config, config["weights_sha256"]), sha256_hex(files[CONFIG_FILE])


def model_label_names(storage: Storage, loaded: LoadedModel) -> tuple[str, ...]:
    """Class names for a model's samples: those of the dataset it was trained on when that is still there and
    agrees with the model's class count, else class_0, class_1, ... (none for an unconditional model). A dataset
    manifest that is there but unreadable is a one-line error naming it (CorruptRecord), never a guess."""
    classes = loaded.model.cfg.num_classes
    dataset = (loaded.config.get("train_job") or {}).get("dataset")
    if is_valid_name(dataset) and storage.exists(dataset_manifest_key(dataset)):
        names = tuple(read_manifest(storage, dataset)["label_names"])
        if not classes or len(names) == classes:
            return names
    return tuple(f"class_{i}" for i in range(classes))


def check_shard_limits(spec: GenerateConfig, num_shards: int, shard_rows: int, image_shape) -> None:
    """Refuse, before any work, a plan whose shards the names, the driver or the Parquet format cannot hold.
    (GenerateConfig refuses too many samples shards already; reconstructions mirror their input's shards.)
    Beyond MAX_SHARDS the 5-digit part names stop sorting in id order, and the driver's ledger and one-object
    manifest, both linear in the shard count, grow past what one driver should hold."""
    if num_shards > MAX_SHARDS:
        raise VaegenError(f"the job would have {num_shards:,} shards; at most {MAX_SHARDS:,} per job"
                          + ("" if spec.kind == "samples" else ": re-ingest the dataset with larger shards"))
    per_image = parquet_image_bytes(image_shape)
    if spec.format == "parquet" and shard_rows * per_image > PARQUET_MAX_IMAGE_BYTES:
        # Parquet/Arrow binary columns have 32-bit offsets; Hugging Face's Image feature does not read the
        # 64-bit large_binary, so the shard must stay under 2 GiB of image bytes.
        most = PARQUET_MAX_IMAGE_BYTES // per_image
        fix = f"use --shard-size {most:,} or less" if spec.kind == "samples" else "re-ingest with smaller shards"
        raise VaegenError(f"a Parquet shard of {shard_rows:,} {'x'.join(map(str, image_shape))} images holds "
                          f"{shard_rows * per_image:,} image bytes, over the format's 2 GiB column limit: {fix}, "
                          "or --format png")


def plan_job(spec: GenerateConfig, storage: Storage) -> JobPlan:
    """Resolve and check everything before any work starts: model, labels, input dataset, job id."""
    loaded, config_sha256 = load_model(storage, spec.model)
    cfg = loaded.model.cfg
    labels: tuple[int, ...] = ()
    input_shards: tuple[dict, ...] = ()
    if spec.kind == "samples":
        if cfg.conditional:
            bad = [label for label in spec.labels if label >= cfg.num_classes]
            if bad:
                raise VaegenError(f"--labels {bad} outside {loaded.ref}'s {cfg.num_classes} classes "
                                  f"(0..{cfg.num_classes - 1})")
            labels = spec.labels or tuple(range(cfg.num_classes))
        elif spec.labels:
            raise VaegenError(f"{loaded.ref} is not class-conditional: drop --labels")
        total, num_shards = spec.count, math.ceil(spec.count / spec.shard_size)
    else:
        manifest = read_manifest(storage, spec.dataset)
        shards = split_shards(manifest, spec.split)
        if tuple(manifest["image_shape"]) != tuple(cfg.image_shape):
            raise VaegenError(f"dataset {spec.dataset!r} holds images of shape {tuple(manifest['image_shape'])} "
                              f"but {loaded.ref} decodes {tuple(cfg.image_shape)}")
        if cfg.conditional and len(manifest["label_names"]) != cfg.num_classes:
            raise VaegenError(f"dataset {spec.dataset!r} has {len(manifest['label_names'])} classes but "
                              f"{loaded.ref} is conditioned on {cfg.num_classes}")
        input_shards = tuple(shards)
        total, num_shards = sum(s["rows"] for s in input_shards), len(input_shards)
    shard_rows = max(s["rows"] for s in input_shards) if input_shards else min(spec.shard_size, total)
    check_shard_limits(spec, num_shards, shard_rows, tuple(cfg.image_shape))
    label_names = tuple(manifest["label_names"]) if input_shards else model_label_names(storage, loaded)
    identity = {**to_dict(spec), "model": str(loaded.ref), "weights_sha256": loaded.weights_sha256,
                "config_sha256": config_sha256,
                "labels": list(labels), "inputs": [s["sha256"] for s in input_shards],
                "label_names": list(label_names), "output_format_version": OUTPUT_FORMAT_VERSION}
    if spec.format == "jpeg":
        identity["image_encoder"] = image_encoder(spec)      # a JPEG's bytes are its encoder's (torchvision's)
    else:
        del identity["jpeg_quality"]            # shapes no byte of another format: --jpeg-quality moves no other id
    return JobPlan(job_id(spec.kind, sha256_hex(json.dumps(identity, sort_keys=True).encode())), spec,
                   str(loaded.ref), loaded.weights_sha256, config_sha256, tuple(cfg.image_shape),
                   labels, total, num_shards, input_shards, label_names)
