"""`vaegen retrain`: train a challenger with the same flags and backends as `vaegen train`, promote it only if it
scores better, and optionally generate from a new champion."""
from __future__ import annotations

import argparse
from dataclasses import replace

from cluster.generate.settings import RunSettings
from vae_core.config import RetrainConfig
from vae_core.use_configs import GenerateConfig

from .args import add_progress_arg, add_train_job_args, counted, train_job_config
from .flags import add_flags, build


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="train a challenger; promote it to champion only if it scores better",
                       description="Scheduled retraining: train a challenger on the current dataset, score it and "
                                   "the champion on the same held-out split (−ELBO per image, fixed seed), promote "
                                   "the challenger only if better by --margin, and record the decision under "
                                   "models/<name>/decisions/.")
    add_train_job_args(p)
    add_progress_arg(p)
    add_flags(p, RetrainConfig, title="contest")
    # What happens after the contest, not a rule of it: no RetrainConfig field.
    next(g for g in p._action_groups if g.title == "contest").add_argument(
        "--then-generate", type=int, default=0, metavar="N",
        help="after a promotion, generate N samples with the new champion (as `vaegen generate` does, with its "
             "default workers)")
    p.set_defaults(run=run_retrain)


def retrain_config(args: argparse.Namespace) -> RetrainConfig:
    return build(RetrainConfig, args, job=train_job_config(args))


def generation_settings(args: argparse.Namespace) -> RunSettings:
    """How --then-generate runs: `vaegen generate`'s defaults, with the Ray address and progress bars of this run
    (--workers and its kin on this verb are Ray Train's, not the decoders')."""
    return build(RunSettings, args, only=("address", "connect_timeout", "progress"))


def run_retrain(args: argparse.Namespace) -> int:
    from .generate_cmds import report
    cfg = retrain_config(args)                       # a bad flag is refused before the slow import of torch
    samples = None
    if args.then_generate:                # checked before hours of training; the version is known after them
        samples = GenerateConfig(model=cfg.job.name, count=args.then_generate)
        settings = generation_settings(args)
    from cluster.train.retrain import retrain
    outcome = retrain(cfg, address=args.address, progress=args.progress, connect_timeout=args.connect_timeout)
    verdict = "PROMOTED" if outcome.promoted else "kept the champion"
    print(f"retrain {cfg.job.name}: {verdict} — {outcome.reason}")
    print(f"  champion now: {outcome.champion or 'none'}; decision record: {outcome.record_key}")
    if samples is not None and outcome.promoted:
        champion = f"{cfg.job.name}@{outcome.champion}"
        print(f"  generating {counted(samples.count, 'sample')} with {champion}")
        from cluster.generate.driver import run_generation
        return report(run_generation(replace(samples, model=champion), cfg.job.storage, settings))
    return 0
