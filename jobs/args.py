"""Flags shared by several verbs, and their translation into the config dataclasses."""
from __future__ import annotations

import argparse

from vae_core.config import (ADAM_IMPLS, ARCHS, LIKELIHOODS, LR_SCHEDULES, OUTPUT_INITS, ModelConfig, RayTrainConfig,
                             StorageConfig, TrainConfig, TrainJobConfig)
from vae_core.errors import VaegenError
from vae_core.presets import PRESETS, with_preset


class Given(argparse.Action):
    """Stores the value and records that the user typed the flag, so a --preset fills only the others."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, "given", given_flags(namespace) | {self.dest})


class GivenTrue(Given):
    def __init__(self, option_strings, dest, default=False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, **kwargs)


def given_flags(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, "given", set()))


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--root", default=StorageConfig.root,
                   help="storage root: a local folder, file://path or s3://bucket/prefix (default: %(default)s)")
    g.add_argument("--s3-endpoint", default=None,
                   help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL, else AWS)")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(root=args.root, s3_endpoint=args.s3_endpoint)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_train_args(p: argparse.ArgumentParser) -> None:
    m, t = ModelConfig(), TrainConfig()
    for name, action in ((None, Given), ("store", Given), ("store_true", GivenTrue)):
        p.register("action", name, action)          # flags added from here on record that they were typed
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named recipe that sets the defaults below (flags you type still win): "
                        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="arch", choices=ARCHS, default=m.arch,
                   help="architecture: mlp (the reference 784-400-20 design) or conv (default: %(default)s)")
    g.add_argument("--latent-dim", type=int, default=m.latent_dim, help="latent size Z (default: %(default)s)")
    g.add_argument("--hidden-dim", type=int, default=m.hidden_dim, help="hidden layer width (default: %(default)s)")
    g.add_argument("--conditional", action="store_true", help="condition encoder and decoder on the labels")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=m.likelihood,
                   help="reconstruction term (default: %(default)s)")
    g.add_argument("--sigma", type=float, default=m.sigma, help="gaussian σ; 0 = learned (default: %(default)s)")
    g.add_argument("--prior-components", type=int, default=m.prior_components, metavar="M",
                   help="0: sample from N(0, I); M > 0: after training, fit a mixture of M Gaussians (per class "
                        "when conditional) to the encoder's posterior and sample from it (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--dataset", default=TrainJobConfig.dataset, help="dataset name under datasets/ (default: %(default)s)")
    g.add_argument("--name", default=None, help="model name in the registry (default: <dataset>-<model>)")
    g.add_argument("--epochs", type=int, default=t.epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--beta", type=float, default=t.beta, help="weight on the KL term (default: %(default)s)")
    g.add_argument("--patience", type=int, default=t.patience, help="early-stopping patience (default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=t.val_fraction, help="(default: %(default)s)")
    g.add_argument("--binarize", action="store_true", help="dynamic binarisation of the pixels per batch")
    g.add_argument("--max-images", type=int, default=0, help="train on the first N images only (0 = all)")
    g.add_argument("--seed", type=int, default=t.seed, help="(default: %(default)s)")
    g.add_argument("--threads", type=int, default=t.threads, help="torch threads; 0 = torch's default")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=t.lr_schedule,
                   help="learning rate per epoch (default: %(default)s)")
    g.add_argument("--kl-warmup-epochs", type=int, default=t.kl_warmup_epochs,
                   help="ramp the KL weight up over the first N epochs (default: %(default)s)")
    g.add_argument("--output-init", choices=OUTPUT_INITS, default=t.output_init,
                   help="mean: the decoder starts at the training images' mean image; default: PyTorch's "
                        "initialisation (default: %(default)s)")
    g.add_argument("--run-id", default=TrainJobConfig.run_id, metavar="ID",
                   help="checkpoints go to train-runs/<run-id>/ (every epoch); rerunning the same id resumes, and "
                        "a finished run returns its version (default: a new id)")
    g.add_argument("--adam", choices=ADAM_IMPLS, default=t.adam,
                   help="fused: one pass over all the weights per Adam step; for-loop: torch's per-tensor loop, "
                        "the same maths with other rounding, slower on CPU (default: %(default)s)")


def train_job_config(args: argparse.Namespace) -> TrainJobConfig:
    model = dict(arch=args.arch, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                 likelihood=args.likelihood, sigma=args.sigma, prior_components=args.prior_components)
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                 patience=args.patience, val_fraction=args.val_fraction, binarize=args.binarize,
                 max_images=args.max_images, seed=args.seed, threads=args.threads,
                 lr_schedule=args.lr_schedule, kl_warmup_epochs=args.kl_warmup_epochs,
                 output_init=args.output_init, adam=args.adam)
    conditional = args.conditional
    if args.preset:
        model, train, preset_conditional = with_preset(args.preset, model, train, given_flags(args))
        conditional = conditional if preset_conditional is None else preset_conditional
    name = args.name or args.preset or f"{args.dataset}-{args.arch}{'-cond' if conditional else ''}"
    return TrainJobConfig(model=ModelConfig(**model), train=TrainConfig(**train), storage=storage_config(args),
                          dataset=args.dataset, name=name, conditional=conditional, run_id=args.run_id,
                          ray=ray_train_config(args))


def add_ray_train_args(p: argparse.ArgumentParser, default_workers: int | None = None) -> None:
    """The backend flags, the same for every verb that trains (train, retrain, pipeline)."""
    r = RayTrainConfig()
    g = p.add_argument_group("Ray Train (data-parallel)")
    g.add_argument("--workers", type=int, default=default_workers, metavar="N",
                   help="train data-parallel on Ray Train with N workers; --batch-size is the global batch "
                        + ("(default: %(default)s)" if default_workers else "(default: one process, no Ray)"))
    g.add_argument("--gpus-per-worker", type=float, default=r.gpus_per_worker, metavar="G",
                   help="GPUs per worker; 0 = CPU workers with gloo, > 0 = NCCL (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=float, default=r.cpus_per_worker, metavar="C",
                   help="(default: %(default)s)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local Ray")
    g.add_argument("--max-failures", type=int, default=r.max_failures, metavar="K",
                   help="worker-group restarts from the last checkpoint before giving up (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=r.checkpoints_to_keep, metavar="K",
                   help="checkpoints kept per run (default: %(default)s)")
    g.add_argument("--stream-epochs", action="store_true",
                   help="stream every epoch from storage instead of keeping each worker's shard in memory")
    g.add_argument("--sync-every", type=int, default=r.sync_every, metavar="K",
                   help="1: all-reduce the gradients every step (exact data-parallel Adam); K > 1: each worker "
                        "steps on its own batches and the workers' weights are averaged every K steps "
                        "(post-local SGD: K times less communication, a slightly different optimisation) "
                        "(default: %(default)s)")


def ray_train_config(args: argparse.Namespace) -> RayTrainConfig | None:
    """The Ray Train settings, or None when --workers is not given (train in one process)."""
    if args.workers is None:
        ray_only = {"--address": args.address, "--gpus-per-worker": args.gpus_per_worker,
                    "--sync-every": args.sync_every != 1, "--stream-epochs": args.stream_epochs}
        given = [flag for flag, value in ray_only.items() if value]
        if given:
            raise VaegenError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to Ray Train: "
                              "add --workers N")
        return None
    return RayTrainConfig(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures, checkpoints_to_keep=args.keep_checkpoints,
                          cache_shards=not args.stream_epochs, sync_every=args.sync_every)
