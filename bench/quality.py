"""Model quality on Fashion-MNIST: train each preset, evaluate it, print ONE JSON line per model.

    PYTHONPATH=$PWD python bench/quality.py --root /tmp/vaegen-quality            # full run (CPU: ~1 h)
    PYTHONPATH=$PWD python bench/quality.py --root /tmp/q-smoke --smoke           # a 1-2 minute check

Each line: IWAE NLL and −ELBO (nats/image; which test images and k), real-data accuracy of the reference
classifier, classifier-FID and TSTR (conditional models), wall times, and the exact settings. --reuse
evaluates a model version already trained with exactly the preset's settings instead of training again.
Published references (Fashion-MNIST, dynamically binarised): Gaussian-prior VAE 228.7 nats (IWAE k=5000),
VampPrior 227.4; TSTR 80.8% (conditional VAE 81.0%) with a real-data classifier at 86.6%."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from cluster.data.datasets import read_manifest
from cluster.data.ingest import ingest_source
from cluster.show.evaluation import evaluate_model
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import open_storage
from cluster.train.driver import train_model
from vae_core.config import StorageConfig, TrainJobConfig, to_dict
from vae_core.errors import VaegenError
from vae_core.presets import PRESETS, preset_job
from vae_core.use_configs import ClassifierConfig, EvalJobConfig

PUBLISHED = {"vae_iwae_nll": 228.7, "vampprior_iwae_nll": 227.4, "tstr": 0.808, "tstr_conditional": 0.810,
             "real_classifier": 0.866}


def existing_version(registry: Registry, job: TrainJobConfig) -> ModelRef | None:
    """The newest version of job.name trained with exactly these settings, if any."""
    for version in reversed(registry.versions(job.name)):
        ref = ModelRef(job.name, version)
        recorded = json.loads(registry.read_file(ref, "config.json")).get("train_job", {})
        wanted = json.loads(json.dumps(to_dict(job)))
        for settings in (recorded, wanted):            # filled in from the dataset, and one run's own name
            settings["model"].pop("image_shape", None), settings["model"].pop("num_classes", None)
            settings.pop("run_id", None)
        if recorded == wanted:
            return ref
    return None


def bench_preset(name: str, args: argparse.Namespace, storage_cfg: StorageConfig) -> dict:
    job = preset_job(name, storage=storage_cfg, dataset="fashion-mnist")
    if args.smoke:
        job = dataclasses.replace(job, name=f"{name}-smoke",
                                  train=dataclasses.replace(job.train, epochs=1, max_images=2000))
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, threads=args.threads))
    registry = Registry(open_storage(storage_cfg))
    ref = existing_version(registry, job) if args.reuse else None
    started = time.perf_counter()
    if ref is None:
        ref = train_model(dataclasses.replace(job, ray=None), progress=args.progress).ref
    metrics = registry.metrics(ref)
    eval_cfg = EvalJobConfig(model=str(ref), storage=storage_cfg, k=args.k, limit=args.limit, seed=0,
                             samples=args.samples, classifier=ClassifierConfig(epochs=args.classifier_epochs))
    eval_started = time.perf_counter()
    report = evaluate_model(eval_cfg, progress=args.progress).report
    lik, quality = report["likelihood"], report.get("quality", {})
    return {"bench": "quality", "model": str(ref), "preset": name, "device": "cpu",
            "train_threads": job.train.threads, "eval_threads": torch.get_num_threads(),
            "nll": round(lik["nll"], 2), "neg_elbo": round(lik["neg_elbo"], 2), "k": lik["k"],
            "nll_images": report["likelihood_images"], "nll_data": lik["data"],
            "test_loss_single_sample": round(metrics.get("test_loss", float("nan")), 2),
            "real_accuracy": quality.get("real_accuracy"), "classifier_fid": quality.get("classifier_fid"),
            "tstr": quality.get("tstr_accuracy"), "tstr_samples": quality.get("samples"),
            "prior_components": job.model.prior_components,
            "prior_elbo_gain_val": metrics.get("prior_elbo_gain_val"),
            "prior_fit_seconds": metrics.get("prior_fit_seconds"),
            "train_seconds": round(metrics.get("seconds", 0.0), 1), "epochs_run": metrics.get("epochs_run"),
            "eval_seconds": round(time.perf_counter() - eval_started, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "settings": {"train_job": {k: v for k, v in to_dict(job).items() if k != "storage"},
                         "eval": report["settings"]},
            "published": PUBLISHED}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/vaegen-quality", help="storage root (default: %(default)s)")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    p.add_argument("--k", type=int, default=1000, help="IWAE samples per image (default: %(default)s)")
    p.add_argument("--limit", type=int, default=1000, help="first N test images for the NLL; 0 = all 10k")
    p.add_argument("--samples", type=int, default=0,
                   help="generated images for FID/TSTR; 0 = as many as the real training split (default)")
    p.add_argument("--classifier-epochs", type=int, default=ClassifierConfig().epochs)
    p.add_argument("--threads", type=int, default=0, help="torch threads for training; 0 = torch's default")
    p.add_argument("--reuse", action="store_true", help="evaluate an existing version with the same settings")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs (not figures)")
    p.add_argument("--progress", action="store_true", help="show progress bars on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.k, args.limit, args.samples, args.classifier_epochs = 10, 100, 500, 1
    storage_cfg = StorageConfig(root=args.root)
    try:
        storage = open_storage(storage_cfg, for_writing=True)
        try:
            read_manifest(storage, "fashion-mnist")
        except VaegenError:
            ingest_source("fashion-mnist", None, storage_cfg, progress=False)
        for name in args.presets:
            print(json.dumps(bench_preset(name, args, storage_cfg)), flush=True)
    except VaegenError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
