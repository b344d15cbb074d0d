"""`vaegen retrain`: train a challenger with the same flags and backends as `vaegen train`, promote it only if it
scores better, and optionally generate from a new champion."""
from __future__ import annotations

import argparse
from dataclasses import replace

from vae_core.config import GenerateConfig

from .args import add_progress_arg, add_train_job_args, train_job_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="train a challenger; promote it to champion only if it scores better",
                       description="Scheduled retraining: train a challenger on the current dataset, score it and "
                                   "the champion on the same held-out split (−ELBO per image, fixed seed), promote "
                                   "the challenger only if better by --margin, and record the decision under "
                                   "models/<name>/decisions/.")
    add_train_job_args(p)
    add_progress_arg(p)
    g = p.add_argument_group("contest")
    g.add_argument("--margin", type=float, default=0.0,
                   help="nats/image the challenger must beat the champion by (default: %(default)s)")
    g.add_argument("--warm-start", action="store_true", help="start the challenger from the champion's weights")
    g.add_argument("--eval-split", default="test", help="held-out split to score on (default: %(default)s)")
    g.add_argument("--eval-seed", type=int, default=0, help="seed of the ELBO estimate (default: %(default)s)")
    g.add_argument("--eval-max-images", type=int, default=0, help="score on the first N images (0 = all)")
    g.add_argument("--then-generate", type=int, default=0, metavar="N",
                   help="after a promotion, generate N samples with the new champion (as `vaegen generate` does, "
                        "with its default workers)")
    p.set_defaults(run=run_retrain)


def run_retrain(args: argparse.Namespace) -> int:
    from cluster.generate import RunSettings, run_generation
    from cluster.retrain import RetrainConfig, retrain

    from .generate_cmds import report
    cfg = RetrainConfig(job=train_job_config(args), margin=args.margin, warm_start=args.warm_start,
                        eval_split=args.eval_split, eval_seed=args.eval_seed, eval_max_images=args.eval_max_images)
    samples = None
    if args.then_generate:                # checked before hours of training; the version is known after them
        samples = GenerateConfig(model=cfg.job.name, count=args.then_generate)
        settings = RunSettings(address=args.address, progress=args.progress)
    outcome = retrain(cfg, address=args.address, progress=args.progress)
    verdict = "PROMOTED" if outcome.promoted else "kept the champion"
    print(f"retrain {cfg.job.name}: {verdict} — {outcome.reason}")
    print(f"  champion now: {outcome.champion or 'none'}; decision record: {outcome.record_key}")
    if samples is not None and outcome.promoted:
        champion = f"{cfg.job.name}@{outcome.champion}"
        print(f"  generating {samples.count} samples with {champion}")
        return report(run_generation(replace(samples, model=champion), cfg.job.storage, settings))
    return 0
