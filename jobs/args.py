"""Flags shared by several verbs (storage, progress bars, the Ray address, the whole training job) and the configs
built from them. The flags themselves are declared beside their fields: vae_core/config.py for storage and
training, cluster/generate/settings.py (RunSettings) for --address and --no-progress."""
from __future__ import annotations

import argparse
from typing import Any

from cluster.generate.settings import RunSettings
from vae_core.config import AUTO_WORKERS, RayTrainConfig, StorageConfig, TrainJobConfig
from vae_core.errors import VaegenError
from vae_core.presets import PRESETS, layer_preset

from .flags import RenamedFlag, add_flags, build, changed_flags, dest_paths, given_dests, namespace_values

RAY_TRAIN_SECTION = "Ray Train (data-parallel)"


def add_storage_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, StorageConfig, title="storage")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return build(StorageConfig, args)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    add_flags(p, RunSettings, only=("progress",))


def add_address_arg(p: argparse.ArgumentParser | Any) -> None:
    """--address of a verb that runs on Ray (not `submit`'s, which names a job server); p may be a group."""
    add_flags(p, RunSettings, only=("address", "connect_timeout"))


def add_train_job_args(p: argparse.ArgumentParser, default_workers: int | str | None = None) -> None:
    """Every flag of a training job (TrainJobConfig: model, training, storage, Ray Train backend), --preset
    under them, and --address: the same for every verb that trains (train, retrain, pipeline)."""
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named recipe that sets the defaults below (flags you type and --config keys still win): "
                        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    add_flags(p, TrainJobConfig, title="job", track_given=True,
              defaults=None if default_workers is None else {"workers": default_workers})
    add_address_arg(next(g for g in p._action_groups if g.title == RAY_TRAIN_SECTION))
    p.add_argument("--model", dest="renamed_model", action=RenamedFlag,
                   message="--model names a published model (generate, sample, evaluate); the architecture to "
                           "train is --arch (mlp or conv)")
    p.set_defaults(effective=effective_train_settings)


def train_job_config(args: argparse.Namespace) -> TrainJobConfig:
    """The TrainJobConfig the flags (and --config file) describe, with --preset under what they set."""
    if args.workers is None:
        ray_only = (["--address"] if args.address else []) + changed_flags(RayTrainConfig, args)
        ray_only = [f for f in ray_only if f != "--workers"]
        if ray_only:
            raise VaegenError(f"{', '.join(ray_only)} {'apply' if len(ray_only) > 1 else 'applies'} only to Ray "
                              "Train: add --workers N")
    sized = [f for f in changed_flags(RayTrainConfig, args) if f in ("--cpus-per-worker", "--gpus-per-worker")]
    if args.workers == AUTO_WORKERS and sized:
        raise VaegenError(f"--workers auto sizes {' and '.join(sized)} too; give --workers N to set "
                          f"{'them' if len(sized) > 1 else 'it'}")
    job = build(TrainJobConfig, args)
    if args.preset:
        paths = dest_paths(TrainJobConfig)
        job = layer_preset(args.preset, job, {paths[d] for d in given_dests(args) if d in paths})
    return job


def effective_train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """dest → value as the job will run (the preset applied), for `vaegen config show`. Written out as a file,
    every setting is explicit, so the preset the file names changes nothing: the same TrainJobConfig. Under
    --workers auto the per-worker resources are sized when the job runs, so they are shown unset."""
    values = namespace_values(train_job_config(args))
    if values.get("workers") == AUTO_WORKERS:
        values.update(cpus_per_worker=None, gpus_per_worker=None)
    return values


def counted(n: int, noun: str) -> str:
    """'1 shard', '2 shards', '10,000 shards': a count with its noun in the right number."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
