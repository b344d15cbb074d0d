"""`vaegen pipeline`: the main job, end to end, on the embedded default (local Ray, local folder storage, real
Fashion-MNIST): ingest → train on Ray Train → generate samples → reconstruct the test split → a quick
likelihood evaluation → summary."""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from vae_core.config import AUTO_WORKERS, TrainJobConfig
from vae_core.use_configs import GenerateConfig

from .args import (
    add_progress_arg,
    add_train_job_args,
    counted,
    storage_config,
    train_job_config,
)
from .flags import add_flags, build

STEPS = 5
SAMPLE_FLAGS = ("count", "shard_size", "format")        # the samples' seed is the training seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the main job: ingest Fashion-MNIST, train on Ray, generate, reconstruct",
                       description="The main job: ingest Fashion-MNIST (once), train a VAE on Ray Train "
                                   "(--workers auto: data-parallel over the cluster's GPUs or nodes; on one machine "
                                   "without GPUs, one worker with all its CPUs), publish a model version, generate "
                                   "samples and reconstruct the test split as Parquet shards, and print a summary.")
    add_train_job_args(p, default_workers=AUTO_WORKERS)
    add_progress_arg(p)
    p.add_argument("--source", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    add_flags(p, GenerateConfig, only=SAMPLE_FLAGS, defaults={"count": 10_000}, title="samples",
              fixed={"model": "pending"})                  # the model it trains
    p.set_defaults(run=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    from cluster.runtime.placement import joined_for_sizing
    config = train_job_config(args)
    with joined_for_sizing(config, args.address, args.connect_timeout):     # one join, for sizing and every step
        return run_steps(config, args)


def run_steps(config: TrainJobConfig, args: argparse.Namespace) -> int:
    from cluster.data.datasets import read_manifest
    from cluster.data.ingest import ingest_source
    from cluster.generate.driver import run_generation, run_reconstruction
    from cluster.runtime.placement import sized_training
    from cluster.runtime.ray_session import ray_runtime
    from cluster.store.storage import open_storage
    from cluster.train.driver import train_model
    from cluster.train.on_ray import local_cpus
    from vae_core.errors import VaegenError

    from .train_cmds import already_trained

    job = sized_training(config, args.address, args.connect_timeout)   # --workers auto: sized now
    samples = build(GenerateConfig, args, only=SAMPLE_FLAGS, model="pending",
                    seed=job.train.seed)                         # checks --count/--shard-size before any work
    storage = open_storage(storage_config(args), for_writing=True)
    with ray_runtime(args.address, num_cpus=local_cpus(job) if job.ray else None,
                     connect_timeout=args.connect_timeout):   # one Ray for every step
        try:
            read_manifest(storage, job.dataset)
            print(f"[1/{STEPS}] dataset {job.dataset} already in {storage.uri}")
        except VaegenError:
            print(f"[1/{STEPS}] ingesting Fashion-MNIST into {storage.uri}")
            ingest_source("fashion-mnist", args.source, job.storage, name=job.dataset, progress=args.progress)
        backend = "in this process"
        if job.ray:
            gpus = f", {job.ray.gpus_per_worker:g} GPU" if job.ray.gpus_per_worker else ""
            backend = (f"on Ray Train with {job.ray.workers} worker{'s' if job.ray.workers > 1 else ''} "
                       f"({job.ray.cpus_per_worker:g} CPUs{gpus} each)")
        print(f"[2/{STEPS}] training {job.name} ({job.model.arch}, {counted(job.train.epochs, 'epoch')}) {backend}")
        trained = train_model(job, address=args.address, progress=args.progress)
        model = str(trained.ref)
        if trained.already_trained:
            print(f"  {already_trained(trained, given_id=bool(job.run_id))}")
        # Two independent jobs, run side by side: each one's start (a DecoderWorker importing torch, loading the
        # model) is one process on one core, so together they take about as long as one.
        print(f"[3/{STEPS}] generating {counted(args.count, 'sample')} from {model}")
        print(f"[4/{STEPS}] reconstructing {job.dataset}/test with {model}")
        with ThreadPoolExecutor(2) as jobs:
            sampling = jobs.submit(run_generation, replace(samples, model=model), job.storage, address=args.address,
                                   progress=args.progress)
            reconstructing = jobs.submit(
                run_reconstruction, GenerateConfig(model=model, kind="reconstructions", dataset=job.dataset,
                                                   split="test", format=args.format),
                job.storage, address=args.address, progress=args.progress)
            generated, reconstructed = sampling.result(), reconstructing.result()

    from cluster.show.evaluation import quick_evaluation, summary_table
    print(f"[5/{STEPS}] scoring {model} on the test split (IWAE k=100, first 500 images; "
          f"`vaegen evaluate --model {model}` gives the full figures)")
    evaluated = quick_evaluation(trained.ref, job.storage, k=100, limit=500)
    print_summary(storage, trained, generated, reconstructed)
    print(summary_table([evaluated]))
    return 0


def print_summary(storage, trained, generated: dict, reconstructed: dict) -> None:
    s = trained.summary
    version_uri = storage.uri_of(f"models/{trained.ref.name}/{trained.ref.version}")
    print(f"\nmodel   {trained.ref} → {version_uri}")
    print(f"        test loss {s.get('test_loss', float('nan')):.2f} nats/image (recon "
          f"{s.get('test_recon', float('nan')):.2f}, KL {s.get('test_kl', float('nan')):.2f}); best epoch "
          f"{s['best_epoch'] + 1} of {s['epochs_run']}; {s['seconds']:.0f} s; samples.png, recon.png, curves.png")
    for label, manifest in (("samples", generated), ("recons", reconstructed)):
        run = manifest.get("run", {})
        rate = f", {run['samples_per_s']:,.0f} img/s" if run.get("samples_per_s") else ""
        print(f"{label:8s}{manifest['totals']['rows']:,} rows in {counted(manifest['totals']['shards'], 'shard')} → "
              f"{manifest['uri']}{rate}")
