"""`vaegen evaluate`: likelihood and sample-quality figures for a model version, written into the version."""
from __future__ import annotations

import argparse

from vae_core.use_configs import ClassifierConfig, EvalJobConfig

from .args import add_progress_arg
from .flags import add_flags, build


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="IWAE NLL, ELBO, classifier-FID and TSTR of a model version",
                       description="Evaluate a model version on its dataset's test split and write evaluation.json "
                                   "and evaluation.png into the version (metrics.json gets a summary).")
    add_flags(p, EvalJobConfig, required=("model",))      # its storage and reference classifier flags included
    add_progress_arg(p)
    p.set_defaults(run=run_evaluate)


def eval_job_config(args: argparse.Namespace) -> EvalJobConfig:
    # The classifiers are seeded by the evaluation's --seed: one seed makes the whole report reproducible.
    return build(EvalJobConfig, args, classifier=build(ClassifierConfig, args, seed=args.seed))


def run_evaluate(args: argparse.Namespace) -> int:
    job = eval_job_config(args)                     # a bad flag is refused before the slow import of torch
    from cluster.show.evaluation import EVALUATION_JSON, EVALUATION_PNG, evaluate_model, summary_line
    result = evaluate_model(job, progress=args.progress)
    print(f"{result.ref}: {summary_line(result.report)}")
    print(f"  wrote {EVALUATION_JSON}, {EVALUATION_PNG} (and a summary in metrics.json) in {result.uri}")
    return 0
