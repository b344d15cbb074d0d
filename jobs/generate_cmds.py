"""`vaegen generate` and `vaegen reconstruct`: flags → GenerateConfig (what the job makes) and RunSettings (how
it runs) → cluster.generate."""
from __future__ import annotations

import argparse

from vae_core.config import FORMATS, PIXELS, GenerateConfig

from .args import add_progress_arg, add_storage_args, storage_config


def add_job_args(p: argparse.ArgumentParser) -> None:
    defaults = GenerateConfig(model="defaults", count=1)
    p.add_argument("--model", required=True, help="name[@version|@latest|@champion] (default version: the champion)")
    p.add_argument("--format", choices=FORMATS, default=defaults.format,
                   help="parquet (raw pixels, zstd) or png (WebDataset tar) (default: %(default)s)")
    p.add_argument("--decode-batch", type=int, default=defaults.decode_batch,
                   help="images per decoder call; part of the job spec (default: %(default)s)")
    g = p.add_argument_group("ray")
    g.add_argument("--workers", type=int, default=2, help="DecoderWorker actors (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=float, default=0.5, help="(default: %(default)s)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0 decodes on CUDA (default: %(default)s)")
    g.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    add_storage_args(p)
    add_progress_arg(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode N samples from a model version into shards under outputs/",
                       description="Sample z from the model's prior (N(0, I), or the mixture fitted by "
                                   "--prior-components), decode, and write Parquet or PNG-tar shards to "
                                   "<root>/outputs/<job-id>/. Rerunning the same command resumes the job.")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--labels", type=int, nargs="+", default=(),
                   help="conditional models: classes to cycle through (default: all)")
    p.add_argument("--pixels", choices=PIXELS, default="sample",
                   help="sample: the model's own x ~ p(x | z), pixel noise included for a Gaussian model; "
                        "mean: the decoder's mean image (the same for a Bernoulli model) (default: %(default)s)")
    add_job_args(p)
    p.set_defaults(run=run_generate)

    p = sub.add_parser("reconstruct", help="reconstruct a dataset split through a model version",
                       description="Encode each image of a dataset split to its posterior mean and decode it; "
                                   "one output shard per input shard under <root>/outputs/<job-id>/.")
    p.add_argument("--dataset", required=True, help="dataset name under datasets/")
    p.add_argument("--split", default="test", help="(default: %(default)s)")
    add_job_args(p)
    p.set_defaults(run=run_reconstruct)


def run_settings(args: argparse.Namespace):
    """How to run the job (not part of its identity), checked before any storage or Ray is touched."""
    from cluster.generate import RunSettings
    return RunSettings(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker, address=args.address, progress=args.progress)


def report(manifest: dict) -> int:
    run, totals = manifest["run"], manifest["totals"]
    print(f"{manifest['kind']} job {manifest['job_id']} from {manifest['model']}: {totals['rows']:,} images in "
          f"{totals['shards']} {manifest['format']} shards at {manifest['uri']} "
          f"({run['shards_written']} written, {run['shards_skipped']} already there)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from cluster.generate import run_generation
    spec = GenerateConfig(model=args.model, kind="samples", count=args.count, shard_size=args.shard_size,
                          seed=args.seed, format=args.format, labels=tuple(args.labels),
                          decode_batch=args.decode_batch, pixels=args.pixels)
    return report(run_generation(spec, storage_config(args), run_settings(args)))


def run_reconstruct(args: argparse.Namespace) -> int:
    from cluster.generate import run_reconstruction
    spec = GenerateConfig(model=args.model, kind="reconstructions", dataset=args.dataset, split=args.split,
                          format=args.format, decode_batch=args.decode_batch)
    return report(run_reconstruction(spec, storage_config(args), run_settings(args)))
