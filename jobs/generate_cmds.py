"""`vaegen generate` and `vaegen reconstruct`: flags → GenerateConfig (what the job makes) and RunSettings (how
it runs) → cluster.generate."""
from __future__ import annotations

import argparse

from cluster.generate.settings import RunSettings
from vae_core.use_configs import GenerateConfig

from .args import add_progress_arg, add_storage_args, counted, storage_config
from .flags import add_flags, build


def add_job_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, GenerateConfig, only=("model", "format", "jpeg_quality", "decode_batch"), required=("model",))
    add_flags(p, RunSettings, skip=("progress",), title="ray")
    add_storage_args(p)
    add_progress_arg(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode N samples from a model version into shards under outputs/",
                       description="Sample z from the model's prior (N(0, I), or the mixture fitted by "
                                   "--prior-components), decode, and write Parquet or PNG-tar shards to "
                                   "<root>/outputs/<job-id>/. Rerunning the same command resumes the job.")
    add_flags(p, GenerateConfig, only=("count", "shard_size", "seed", "labels", "pixels"), required=("count",))
    add_job_args(p)
    p.set_defaults(run=run_generate)

    p = sub.add_parser("reconstruct", help="reconstruct a dataset split through a model version",
                       description="Encode each image of a dataset split to its posterior mean and decode it; "
                                   "one output shard per input shard under <root>/outputs/<job-id>/.")
    add_flags(p, GenerateConfig, only=("dataset", "split"), required=("dataset",), fixed={"kind": "reconstructions"})
    add_job_args(p)
    p.set_defaults(run=run_reconstruct)


def run_settings(args: argparse.Namespace) -> RunSettings:
    """How to run the job (not part of its identity), checked before any storage or Ray is touched."""
    return build(RunSettings, args)


def report(manifest: dict) -> int:
    run, totals = manifest["run"], manifest["totals"]
    print(f"{manifest['kind']} job {manifest['job_id']} from {manifest['model']}: {counted(totals['rows'], 'image')} "
          f"in {counted(totals['shards'], manifest['format'] + ' shard')} at {manifest['uri']} "
          f"({run['shards_written']} written, {run['shards_skipped']} already there)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    spec, settings = build(GenerateConfig, args, kind="samples"), run_settings(args)   # checked before torch loads
    from cluster.generate.driver import run_generation
    return report(run_generation(spec, storage_config(args), settings))


def run_reconstruct(args: argparse.Namespace) -> int:
    spec, settings = build(GenerateConfig, args, kind="reconstructions"), run_settings(args)
    from cluster.generate.driver import run_reconstruction
    return report(run_reconstruction(spec, storage_config(args), settings))
