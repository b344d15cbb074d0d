"""`vaegen train` and `vaegen sample`."""
from __future__ import annotations

import argparse

from dataclasses import replace

from .args import (add_progress_arg, add_ray_train_args, add_storage_args, add_train_args, ray_train_config,
                   storage_config, train_job_config)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VAE on an ingested dataset and publish a model version",
                       description="Train a VAE and publish it as models/<name>/v000N/ on the storage root.")
    add_train_args(p)
    add_ray_train_args(p)
    add_storage_args(p)
    add_progress_arg(p)
    p.set_defaults(run=run_train)

    p = sub.add_parser("sample", help="write a PNG grid of samples from a model version",
                       description="Decode latents drawn from the prior into a PNG grid.")
    p.add_argument("--model", required=True, help="name[@version|@latest|@champion]")
    p.add_argument("--count", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class to sample (conditional models)")
    p.add_argument("--out", default="samples.png", help="local PNG path (default: %(default)s)")
    add_storage_args(p)
    p.set_defaults(run=run_sample)


def run_train(args: argparse.Namespace) -> int:
    job, ray_settings = train_job_config(args), ray_train_config(args)
    if ray_settings is None:
        from cluster.local_train import train_single_process
        result = train_single_process(job, progress=args.progress)
    else:
        from cluster.train import train_on_ray
        result = train_on_ray(replace(job, ray=ray_settings), address=args.address, progress=args.progress)
        print(f"run {result.summary['run_id']}: {result.summary['workers']} workers, "
              f"{result.summary['epochs_run']} epochs")
    s = result.summary
    test = f", test loss {s['test_loss']:.2f}" if "test_loss" in s else ""
    print(f"published {result.ref}: best epoch {s['best_epoch'] + 1}, val loss {s['best_val_loss']:.2f}{test} "
          f"nats/image")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from cluster.registry import Registry
    from cluster.storage import open_storage
    from vae_core.errors import VaegenError
    from vae_core.images import image_grid, png_bytes, to_uint8

    if args.count <= 0:
        raise VaegenError(f"--count={args.count} must be > 0")
    loaded = Registry(open_storage(storage_config(args))).load(args.model)
    cfg = loaded.model.cfg
    labels = None
    if cfg.conditional:
        if args.label is not None and not 0 <= args.label < cfg.num_classes:
            raise VaegenError(f"--label={args.label} is outside the model's {cfg.num_classes} classes")
        labels = (torch.full((args.count,), args.label) if args.label is not None
                  else torch.arange(args.count) % cfg.num_classes)
    elif args.label is not None:
        raise VaegenError(f"{loaded.ref} is not conditional: drop --label")
    z = loaded.model.sample_prior(args.count, labels, torch.Generator().manual_seed(args.seed))
    with open(args.out, "wb") as f:
        f.write(png_bytes(image_grid(to_uint8(loaded.model.generate(z, labels)))))
    print(f"wrote {args.count} samples of {loaded.ref} to {args.out}")
    return 0
