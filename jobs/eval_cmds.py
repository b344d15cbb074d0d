"""`vaegen evaluate`: likelihood and sample-quality figures for a model version, written into the version."""
from __future__ import annotations

import argparse

from vae_core.classifier import ClassifierConfig
from vae_core.evaluate import EvalJobConfig
from vae_core.names import check_model_spec, check_name

from .args import add_progress_arg, add_storage_args, storage_config


def register(sub: argparse._SubParsersAction) -> None:
    e, c = EvalJobConfig(model="defaults"), ClassifierConfig()
    p = sub.add_parser("evaluate", help="IWAE NLL, ELBO, classifier-FID and TSTR of a model version",
                       description="Evaluate a model version on its dataset's test split and write evaluation.json "
                                   "and evaluation.png into the version (metrics.json gets a summary).")
    p.add_argument("--model", required=True, help="name[@version|@latest|@champion]")
    p.add_argument("--k", type=int, default=e.k, help="importance samples per image (default: %(default)s)")
    p.add_argument("--limit", type=int, default=e.limit,
                   help="likelihood on the first N images only; 0 = the whole split (default: %(default)s)")
    p.add_argument("--split", default=e.split, help="dataset split (default: test if present, else train)")
    p.add_argument("--seed", type=int, default=e.seed, help="(default: %(default)s)")
    p.add_argument("--samples", type=int, default=e.samples,
                   help="generated images for classifier-FID and TSTR; 0 = as many as the real training split "
                        "the reference classifier learnt from (default: %(default)s)")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="likelihood only: skip the reference classifier, FID and TSTR")
    p.add_argument("--classifier-epochs", type=int, default=c.epochs,
                   help="epochs for the reference and TSTR classifiers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=e.batch_size,
                   help="images encoded at once for the IWAE bound (default: %(default)s)")
    add_storage_args(p)
    add_progress_arg(p)
    p.set_defaults(run=run_evaluate)


def eval_job_config(args: argparse.Namespace) -> EvalJobConfig:
    check_model_spec(args.model, "--model")
    if args.split:                                   # "" = test if present, else train
        check_name(args.split, "--split")
    return EvalJobConfig(model=args.model, storage=storage_config(args), k=args.k, limit=args.limit,
                         split=args.split, seed=args.seed, samples=args.samples, quality=args.quality,
                         classifier=ClassifierConfig(epochs=args.classifier_epochs, seed=args.seed),
                         batch_size=args.batch_size)


def run_evaluate(args: argparse.Namespace) -> int:
    from cluster.evaluation import EVALUATION_JSON, EVALUATION_PNG, evaluate_model, summary_line
    result = evaluate_model(eval_job_config(args), progress=args.progress)
    print(f"{result.ref}: {summary_line(result.report)}")
    print(f"  wrote {EVALUATION_JSON}, {EVALUATION_PNG} (and a summary in metrics.json) in {result.uri}")
    return 0
