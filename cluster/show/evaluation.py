"""`vaegen evaluate` on storage: a model version + its dataset's split in, evaluation.json/.png out.

The reference classifier is trained once per dataset and kept at classifiers/<dataset>/ (weights written
first, classifier.json last: a classifier without its json does not exist); it is retrained only when the
dataset's shards change. Results go into the model version: evaluation.json and evaluation.png, and a
short "evaluation" entry merged into metrics.json (one atomic rewrite of the whole file).

torch, the classifier and the training code load when an evaluation runs, inside the functions that run it:
`vaegen show` reads a report with this module's names and summary_line alone, and stays free of them."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from vae_core.progress import Progress as tqdm      # plain lines when not on a terminal

from cluster.data.datasets import read_manifest, read_split, split_shards
from cluster.store.registry import LoadedModel, ModelRef, Registry
from cluster.store.storage import Storage, open_storage_to_write_later
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError
from vae_core.use_configs import ClassifierConfig, EvalJobConfig

if TYPE_CHECKING:
    from vae_core.classifier import ReferenceCNN
    from vae_core.train import ImageSet

EVALUATION_JSON = "evaluation.json"
EVALUATION_PNG = "evaluation.png"


def classifier_key(dataset: str, fname: str) -> str:
    return f"classifiers/{dataset}/{fname}"


def reference_classifier(storage: Storage, dataset: str, cfg: ClassifierConfig,
                         progress: bool = False) -> tuple[ReferenceCNN, dict]:
    """The dataset's reference classifier: loaded if stored for these exact shards and settings, else
    trained on the train split (test accuracy recorded when there is a test split), each cut to cfg.max_images
    rows where that is set (split_sample), and stored."""
    from cluster.train.runs import manifest_digest
    from vae_core.classifier import (
        CLASSIFIER_CONFIG,
        CLASSIFIER_WEIGHTS,
        accuracy,
        classifier_files,
        load_classifier,
        train_classifier,
    )
    manifest = read_manifest(storage, dataset)
    digest = manifest_digest(manifest)
    meta_key = classifier_key(dataset, CLASSIFIER_CONFIG)
    if storage.exists(meta_key):
        model, meta = load_classifier({f: storage.read_bytes(classifier_key(dataset, f))
                                       for f in (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS)})
        if meta.get("dataset_manifest_sha256") == digest and meta.get("settings") == cfg.to_dict():
            return model, meta
    if "train" not in manifest["splits"]:
        raise VaegenError(f"dataset {dataset!r} has no train split to fit its reference classifier on")
    train = split_sample(storage, dataset, "train", cfg.max_images, manifest)
    started = time.perf_counter()
    # A bar over every epoch's images: the classifier is a few minutes on a CPU, done once per dataset.
    with tqdm(total=cfg.epochs * len(train), unit="img", unit_scale=True, disable=not progress,
              desc=f"reference classifier for {dataset} ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''})") as bar:
        model = train_classifier(train.images, train.labels, len(manifest["label_names"]), cfg, bar.update)
    meta = {"dataset": dataset, "dataset_manifest_sha256": digest, "settings": cfg.to_dict(),
            "train_images": len(train), "train_seconds": time.perf_counter() - started}
    if "test" in manifest["splits"]:
        test = split_sample(storage, dataset, "test", cfg.max_images, manifest)
        meta.update(test_accuracy=accuracy(model, test.images, test.labels), test_images=len(test))
    files = classifier_files(model, meta)
    storage.publish(classifier_key(dataset, CLASSIFIER_WEIGHTS), files[CLASSIFIER_WEIGHTS])
    storage.publish(meta_key, files[CLASSIFIER_CONFIG])
    return model, json.loads(files[CLASSIFIER_CONFIG])


def split_sample(storage: Storage, dataset: str, split: str, most: int, manifest: dict) -> ImageSet:
    """A split's rows, or `most` of them evenly spaced over it (0: all of them): an image folder is ingested class
    by class, so its first rows would be its first class only."""
    import torch

    from cluster.train.runs import to_image_set
    rows = to_image_set(read_split(storage, dataset, split, manifest=manifest))
    if not most or len(rows) <= most:
        return rows
    return rows.subset(torch.from_numpy(evenly_spaced(len(rows), most)))


def evenly_spaced(count: int, most: int) -> np.ndarray:
    """`most` of the row numbers 0..count-1 (most < count), evenly spaced from the first."""
    return np.arange(most, dtype=np.int64) * count // most


def model_dataset(loaded: LoadedModel) -> str:
    job = loaded.config.get("train_job") or {}
    if not job.get("dataset"):
        raise VaegenError(f"{loaded.ref} records no training dataset in its config.json; cannot evaluate it")
    return job["dataset"]


def pick_split(manifest: dict, wanted: str) -> str:
    if wanted:
        split_shards(manifest, wanted)                 # refuses a split the dataset lacks
        return wanted
    return "test" if "test" in manifest["splits"] else "train"


@dataclass
class EvaluationResult:
    ref: ModelRef
    report: dict              # what evaluation.json holds
    uri: str                  # the model version's folder


def evaluate_model(cfg: EvalJobConfig, progress: bool = True) -> EvaluationResult:
    """Likelihood (IWAE_k NLL and −ELBO) on a split, and with cfg.quality the classifier metrics; writes
    evaluation.json + evaluation.png into the model version and merges a summary into metrics.json."""
    import torch

    from cluster.train.runs import to_image_set
    from vae_core.evaluate import evaluation_png, model_likelihood
    storage = open_storage_to_write_later(cfg.storage)
    registry = Registry(storage)
    loaded = registry.load(cfg.model)          # no model: refused before the root is written
    storage.check_writable()
    model, ref = loaded.model, loaded.ref
    dataset = model_dataset(loaded)
    manifest = read_manifest(storage, dataset)
    split = pick_split(manifest, cfg.split)
    data = to_image_set(read_split(storage, dataset, split))
    if tuple(data.images.shape[1:]) != tuple(model.cfg.image_shape):
        raise VaegenError(f"{ref} takes images {tuple(model.cfg.image_shape)} but dataset {dataset!r} holds "
                          f"{tuple(data.images.shape[1:])}")
    subset = data.subset(torch.arange(min(cfg.limit or len(data), len(data))))
    started = time.perf_counter()
    with tqdm(total=len(subset), unit="img", desc=f"IWAE k={cfg.k} {ref}", disable=not progress) as bar:
        lik = model_likelihood(model, subset.images, subset.labels, k=cfg.k, seed=cfg.seed,
                               batch_size=cfg.batch_size, progress=bar.update)
    report = {"model": str(ref), "dataset": dataset, "split": split, "likelihood_model": model.cfg.likelihood,
              "conditional": model.cfg.conditional, "likelihood": lik.to_dict(),
              "likelihood_images": f"first {len(subset)} of {len(data)} {split} images"}
    if cfg.quality:
        report["quality"] = _quality(storage, dataset, model, data, cfg, progress)
    report["seconds"] = time.perf_counter() - started
    report["settings"] = {"k": cfg.k, "limit": cfg.limit, "seed": cfg.seed, "samples": cfg.samples,
                          "classifier": cfg.classifier.to_dict()}
    history = _history(registry, ref)
    picture = evaluation_png(model, data.images[:32], data.labels[:32], history,
                             f"{ref} on {dataset}/{split}: {summary_line(report)}")
    prefix = f"models/{ref.name}/{ref.version}"
    storage.publish(f"{prefix}/{EVALUATION_PNG}", picture)
    storage.publish(f"{prefix}/{EVALUATION_JSON}", json.dumps(report, indent=2, sort_keys=True).encode())
    _merge_into_metrics(storage, registry, ref, report)
    return EvaluationResult(ref, report, storage.uri_of(prefix))


def quick_evaluation(model: str | ModelRef, storage: StorageConfig, *, k: int = 100,
                     limit: int = 500) -> EvaluationResult:
    """A short likelihood-only evaluation for the end of `vaegen pipeline` (seconds on a CPU: no
    classifier); `vaegen evaluate` gives the full figures."""
    return evaluate_model(EvalJobConfig(model=str(model), storage=storage, k=k, limit=limit, quality=False),
                          progress=False)


def _quality(storage: Storage, dataset: str, model, data: ImageSet, cfg: EvalJobConfig, progress: bool) -> dict:
    from vae_core.evaluate import sample_quality
    if data.labels is None or len(read_manifest(storage, dataset)["label_names"]) < 2:
        return {"skipped": f"dataset {dataset!r} has fewer than 2 labels: no classifier to judge samples with"}
    reference, meta = reference_classifier(storage, dataset, cfg.classifier, progress)
    samples = max(cfg.samples or meta["train_images"], 2)
    if progress:
        print(f"sample quality: {samples} samples, classifier-FID"
              f"{' and TSTR' if model.cfg.conditional else ''}...", flush=True)
    with tqdm(total=cfg.classifier.epochs * samples, unit="img", unit_scale=True, desc="TSTR classifier",
              disable=not (progress and model.cfg.conditional)) as bar:
        quality = sample_quality(model, reference, data.images, data.labels, samples=samples, seed=cfg.seed,
                                 classifier_cfg=cfg.classifier, on_tstr_batch=bar.update)
    return {**quality.to_dict(), "reference_classifier": {k: meta.get(k) for k in
                                                           ("settings", "train_images", "test_accuracy")}}


def _history(registry: Registry, ref: ModelRef) -> list[dict]:
    try:
        return registry.metrics(ref).get("history", [])
    except (VaegenError, ValueError):
        return []


def _merge_into_metrics(storage: Storage, registry: Registry, ref: ModelRef, report: dict) -> None:
    key = f"models/{ref.name}/{ref.version}/metrics.json"
    metrics = registry.metrics(ref) if storage.exists(key) else {}
    metrics["evaluation"] = {"summary": summary_line(report), "file": EVALUATION_JSON,
                             "nll": report["likelihood"]["nll"], "neg_elbo": report["likelihood"]["neg_elbo"],
                             "k": report["likelihood"]["k"], "images": report["likelihood"]["images"],
                             **{k: report.get("quality", {}).get(k)
                                for k in ("real_accuracy", "classifier_fid", "tstr_accuracy")}}
    storage.publish(key, json.dumps(metrics, indent=2, sort_keys=True).encode())


def summary_line(report: dict) -> str:
    """One line: 'NLL X nats (IWAE k=K, N imgs, binarised|continuous[, prior: P]), -ELBO Y', then, when sample
    quality was measured, ' | real acc A%, classifier-FID F, TSTR T%' (or why there is no TSTR)."""
    lik = report["likelihood"]
    kind = "binarised" if report["likelihood_model"] == "bernoulli" else "continuous"
    prior = "" if lik.get("prior", "N(0, I)") == "N(0, I)" else f", prior: {lik['prior']}"
    line = (f"NLL {lik['nll']:.1f} nats (IWAE k={lik['k']}, {lik['images']} imgs, {kind}{prior}), "
            f"-ELBO {lik['neg_elbo']:.1f}")
    q = report.get("quality") or {}
    if "real_accuracy" in q:
        line += f" | real acc {100 * q['real_accuracy']:.1f}%, classifier-FID {q['classifier_fid']:.2f}"
        if q.get("tstr_accuracy") is not None:
            line += f", TSTR {100 * q['tstr_accuracy']:.1f}%"
        else:                        # TSTR trains on labelled samples: an unconditional model draws none
            line += ", no TSTR (unconditional model: its samples have no labels)"
    return line


def summary_table(results: list[EvaluationResult]) -> str:
    """A short table for the end of `vaegen pipeline`: one line per evaluated model version."""
    width = max((len(str(r.ref)) for r in results), default=5)
    return "\n".join(f"  {str(r.ref):<{width}}  {summary_line(r.report)}" for r in results)
