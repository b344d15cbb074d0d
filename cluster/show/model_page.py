"""The model part of `vaegen show`'s gallery: a model version's metrics in words, the settings it was trained
with, its loss curves (matplotlib), captioned sample and reconstruction grids, the per-epoch sample grids, and
its evaluation (what `vaegen evaluate` wrote) when it has one."""
from __future__ import annotations

import json
from types import SimpleNamespace

from cluster.show.evaluation import EVALUATION_JSON, EVALUATION_PNG, summary_line
from cluster.show.html import esc, facts, figure, settings_table
from cluster.show.inventory import read_metrics
from cluster.store.records import RECORD_ERRORS, as_object
from cluster.store.registry import ModelRef, Registry
from cluster.train.epoch_samples import SAMPLE_RE, SAMPLES_DIR
from vae_core.config import ModelConfig, RayTrainConfig, TrainConfig
from vae_core.grids import RECON_CAPTION, epoch_samples_caption, samples_caption
from vae_core.plots import loss_curves_png

EPOCH_GRIDS_SHOWN = 24        # a long run shows this many of its per-epoch grids, evenly spaced, first and last

# metrics.json keys in words (unit in brackets); a key not listed here is shown with its underscores as spaces.
METRIC_LABELS = {
    "test_loss": "test loss (nats/image)", "test_recon": "test reconstruction term (nats/image)",
    "test_kl": "test KL term (nats/image)", "test_images": "test images",
    "best_epoch": "best epoch", "best_val_loss": "best validation loss (nats/image)",
    "epochs_run": "epochs run", "stopped_early": "stopped early", "train_images": "training images",
    "val_images": "validation images", "seconds": "training time (s)", "run_id": "training run id",
    "backend": "trained on", "resumed_at_epochs": "started at epoch", "seconds_to_first_batch": "first batch after (s)",
    "workers": "Ray Train workers", "gpus_per_worker": "GPUs per worker",
    "sync_every": "weights averaged every (steps)",
    "prior_fit_seconds": "prior fit time (s)",
}
ONE_BASED = {"best_epoch", "resumed_at_epochs"}        # stored 0-based, shown as a person counts epochs


def metric_text(key: str, value) -> str:
    if key in ONE_BASED and value is not None:
        value = [v + 1 for v in value] if isinstance(value, list) else value + 1
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def metrics_facts(metrics: dict) -> str:
    shown = [(METRIC_LABELS.get(k, k.replace("_", " ")), metric_text(k, v), None) for k, v in metrics.items()
             if k not in ("history", "evaluation") and isinstance(v, (int, float, str, list, type(None)))]
    order = list(METRIC_LABELS.values())
    shown.sort(key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))
    return facts(shown)


def model_section(registry: Registry, ref: ModelRef) -> list[str]:
    """Everything a model version carries that a person looks at (whichever of it the version has)."""
    out = [f"<h2>model {esc(ref)}</h2>"]
    # The settings the version was built with; a config.json that does not parse means the version cannot be
    # loaded at all, so the page says so in one line rather than showing it as if it were usable.
    config = registry.config(ref)
    metrics = read_metrics(registry, ref.name, ref.version) or {}
    if metrics:
        out.append("<h3>summary</h3>" + metrics_facts(metrics))
    out += hyperparameters(config)
    out += plots(registry, ref, config, metrics)
    out += epoch_grids(registry, ref, config)
    out += evaluation(registry, ref, metrics)
    return out


def hyperparameters(config: dict) -> list[str]:
    out = ["<h3>model settings</h3>", settings_table(ModelConfig, config["model"], "model-settings")]
    job = config.get("train_job")
    if isinstance(job, dict):
        top = {k: job.get(k) for k in ("dataset", "name", "conditional", "run_id") if k in job}
        out += ['<h3 id="hyperparameters">training settings</h3>',
                settings_table(TrainConfig, {**top, **(job.get("train") or {})}, "training-settings")]
        if isinstance(job.get("ray"), dict):
            out += ["<h3>Ray Train</h3>", settings_table(RayTrainConfig, job["ray"], "ray-settings")]
    return out


def plots(registry: Registry, ref: ModelRef, config: dict, metrics: dict) -> list[str]:
    """Loss curves drawn now from metrics.json's history (else the version's curves.png), then the grids."""
    storage = registry.storage
    out = []
    history = metrics.get("history") or []
    if history:
        curves = loss_curves_png(history, best_epoch=metrics.get("best_epoch"))
        out.append("<h3>loss curves</h3>" + figure(
            curves, "loss curves", "loss per image (nats) on the training images (train) and on the held-out "
            "validation images after each epoch; the dotted line marks the epoch whose weights were kept"))
    elif storage.exists(key := registry.key(ref.name, ref.version, "curves.png")):
        out.append("<h3>loss curves</h3>" + figure(storage.read_bytes(key), "loss curves", "train and validation "
                                                   "loss per epoch"))
    model_cfg = SimpleNamespace(conditional=int(config["model"].get("num_classes") or 0) > 0)
    for fname, heading, caption in (("samples.png", "samples", samples_caption(model_cfg)),
                                    ("recon.png", "reconstructions", RECON_CAPTION)):
        key = registry.key(ref.name, ref.version, fname)
        if storage.exists(key):
            out.append(f"<h3>{heading}</h3>" + figure(storage.read_bytes(key), heading, caption, css="grid"))
    return out


def epoch_grids(registry: Registry, ref: ModelRef, config: dict) -> list[str]:
    """The per-epoch grids (samples/sample_N.png) as a sequence, oldest first."""
    storage = registry.storage
    prefix = registry.key(ref.name, ref.version, SAMPLES_DIR)
    found = sorted((int(m.group(1)), e.key) for e in storage.list(prefix)
                   if (m := SAMPLE_RE.match(e.key.rsplit("/", 1)[-1])))
    if not found:
        return []
    if len(found) > EPOCH_GRIDS_SHOWN:
        step = (len(found) - 1) / (EPOCH_GRIDS_SHOWN - 1)
        found = [found[round(i * step)] for i in range(EPOCH_GRIDS_SHOWN)]
    model_cfg = SimpleNamespace(conditional=int(config["model"].get("num_classes") or 0) > 0)
    tiles = "".join(figure(storage.read_bytes(key), f"samples after epoch {n}", f"epoch {n}", css="epoch")
                    for n, key in found)
    return [f'<h3 id="epoch-samples" data-count="{len(found)}">samples after each epoch</h3>'
            f"<p>{esc(epoch_samples_caption(model_cfg))}</p><div class=\"epochs\">{tiles}</div>"]


def evaluation(registry: Registry, ref: ModelRef, metrics: dict) -> list[str]:
    """What `vaegen evaluate` wrote (evaluation.json, evaluation.png), or how to get it."""
    storage = registry.storage
    key = registry.key(ref.name, ref.version, EVALUATION_JSON)
    if not storage.exists(key):
        return ['<h2 id="evaluation" data-evaluated="no">evaluation</h2><p>not evaluated yet: '
                f"<code>vaegen evaluate --model {esc(ref)}</code> measures NLL, −ELBO and sample quality</p>"]
    try:
        report = as_object(json.loads(storage.read_bytes(key)))
        lik = as_object(report["likelihood"])
        line = summary_line(report)
    except (*RECORD_ERRORS, ValueError):
        return ['<h2 id="evaluation" data-evaluated="unreadable">evaluation</h2>'
                f"<p>{esc(storage.uri_of(key))} cannot be read: run <code>vaegen evaluate --model {esc(ref)}</code> "
                "again</p>"]
    items = [("summary", line, None),
             (f"NLL (IWAE bound, k={lik['k']})", f"{lik['nll']:.2f} nats/image", None),
             ("−ELBO", f"{lik['neg_elbo']:.2f} nats/image", None),
             ("images", report.get("likelihood_images") or f"{lik['images']}", None),
             ("dataset / split", f"{report.get('dataset')} / {report.get('split')}", None),
             ("pixels", str(lik.get("data", "-")), None), ("prior", str(lik.get("prior", "N(0, I)")), None)]
    quality = report.get("quality") or {}
    if "skipped" in quality:
        items.append(("sample quality", f"skipped: {quality['skipped']}", None))
    elif "real_accuracy" in quality:
        items += [("reference classifier accuracy on real images", f"{100 * quality['real_accuracy']:.1f}%", None),
                  ("classifier-FID (real vs generated)", f"{quality['classifier_fid']:.2f}", None),
                  ("TSTR accuracy (train on generated, test on real)",
                   "-" if quality.get("tstr_accuracy") is None else f"{100 * quality['tstr_accuracy']:.1f}%"
                   + (f" ({quality['tstr_note']})" if quality.get("tstr_note") else ""), None),
                  ("samples judged", f"{quality.get('samples', '-'):,}" if isinstance(quality.get("samples"), int)
                   else "-", None)]
    out = ['<h2 id="evaluation" data-evaluated="yes">evaluation</h2>', facts(items)]
    picture = registry.key(ref.name, ref.version, EVALUATION_PNG)
    if storage.exists(picture):
        out.append(figure(storage.read_bytes(picture), "evaluation", "evaluation.png, top to bottom: samples from "
                          "the prior (a row per class when conditional); originals (odd rows) above their "
                          "reconstructions (even rows); a traversal of latent dims 0 and 1; the training curves"))
    return out
