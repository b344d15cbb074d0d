"""`vaegen retrain`: train a challenger on the current dataset, score it and the champion on the same held-out
split with the same metric, and promote it only if it is better by a margin.

Order of writes, so that a crash never leaves a record claiming a promotion that did not happen: challenger
version (an ordinary, complete model version) → decision record → compare-and-swap of champion.json → final
record. A promotion's record is first written as "pending"; champion.json names its record, so a "pending"
record is a promotion exactly when the pointer names it, and the next retrain rewrites it to "promote" before
it may swap the pointer itself. If the record cannot be written nothing is promoted; if another run swapped
the pointer first, ours is refused and the record says so. A score that is not a finite number never wins."""
from __future__ import annotations

import json
import math
import socket
import time
import uuid
from dataclasses import dataclass

from cluster.data.datasets import bind_model_to_dataset, read_manifest, read_split
from cluster.store.records import CorruptRecord
from cluster.store.registry import (
    CORRUPT_POINTER,
    DECISIONS_DIR,
    ModelRef,
    Registry,
    record_decision,
    rewrite_decision,
    swap_champion,
)
from cluster.store.storage import open_storage
from cluster.train.driver import train_model
from cluster.train.runs import fresh_run_id, job_settings, manifest_digest, to_image_set
from vae_core import __version__
from vae_core.config import RetrainConfig, TrainConfig, TrainJobConfig, to_dict
from vae_core.errors import VaegenError
from vae_core.models import VAE
from vae_core.names import is_valid_name
from vae_core.train import evaluate, iterate_batches

METRIC = "neg_elbo_nats_per_image"       # −ELBO per image with β = 1: lower is better


@dataclass
class RetrainOutcome:
    promoted: bool
    champion: str | None          # the champion version after this run
    challenger: str
    reason: str
    record_key: str
    record: dict


def train_challenger(job: TrainJobConfig, initial_state: dict | None, address: str | None,
                     progress: bool) -> ModelRef:
    """The challenger, trained by the one entry point: in this process or on Ray Train, as job.ray says. Without
    --run-id a run id of its own: each retrain (a scheduled one on unchanged data too) trains a new challenger."""
    return train_model(fresh_run_id(job), address=address, progress=progress, initial_state=initial_state).ref


def score(model: VAE, images, cfg: RetrainConfig) -> float:
    """−ELBO per image (β = 1, no binarisation, fixed seed): the same yardstick for every model."""
    yardstick = TrainConfig(beta=1.0, binarize=False, seed=cfg.eval_seed)
    return evaluate(model, iterate_batches(images, 1024), yardstick)["loss"]


def decide(champion_metric: float | None, challenger_metric: float, margin: float,
           champion: str | None, challenger: str) -> tuple[bool, str]:
    """(promote?, why). A challenger whose score is NaN or infinite is never promoted; a champion whose score is
    not finite loses to any challenger whose score is (NaN compares false both ways, so it must be caught first)."""
    if not math.isfinite(challenger_metric):
        return False, f"challenger {challenger} scored {challenger_metric} (not a finite number): not promoted"
    if champion is None:
        return True, "no champion yet: the first challenger is promoted"
    if champion_metric is None:
        return True, f"champion {champion} could not be scored: promoting {challenger}"
    if not math.isfinite(champion_metric):
        return True, f"champion {champion} scored {champion_metric} (not a finite number): promoting {challenger}"
    gain = champion_metric - challenger_metric
    if gain > margin:
        return True, (f"challenger {challenger} beats champion {champion} by {gain:.3f} nats/image "
                      f"(> margin {margin})")
    if gain > 0:
        return False, (f"challenger {challenger} is better than champion {champion} by only {gain:.3f} "
                       f"nats/image (margin {margin})")
    return False, f"challenger {challenger} is worse than champion {champion} by {-gain:.3f} nats/image"


def retrain(cfg: RetrainConfig, *, address: str | None = None, progress: bool = False) -> RetrainOutcome:
    """`address` joins a Ray cluster when the challenger trains on Ray (cfg.job.ray)."""
    job = cfg.job
    storage = open_storage(job.storage, for_writing=True)
    registry = Registry(storage)
    manifest = read_manifest(storage, job.dataset)              # no dataset → a clear VaegenError now
    if cfg.eval_split not in manifest["splits"]:
        raise VaegenError(f"dataset {job.dataset!r} has no held-out split {cfg.eval_split!r} to score models on "
                          f"(splits: {', '.join(manifest['splits'])}); pass --eval-split")
    model_cfg = bind_model_to_dataset(job.model, manifest, job.conditional)
    held_out = to_image_set(read_split(storage, job.dataset, cfg.eval_split, limit=cfg.eval_max_images,
                                      manifest=manifest))

    champion, champion_model, champion_error, expected = read_champion(registry, job.name)
    if cfg.warm_start and champion_model is not None and champion_model.cfg != model_cfg:
        raise VaegenError(f"--warm-start: champion {job.name}@{champion} has model settings "
                          f"{to_dict(champion_model.cfg)}, the challenger {to_dict(model_cfg)}; make them match")
    initial = champion_model.state_dict() if cfg.warm_start and champion_model is not None else None

    challenger_ref = train_challenger(job, initial, address, progress)
    challenger_metric = score(registry.load(challenger_ref).model, held_out, cfg)
    champion_metric = score(champion_model, held_out, cfg) if champion_model is not None else None
    contested = champion or ("the unreadable champion.json" if expected == CORRUPT_POINTER else None)
    promote, reason = decide(champion_metric, challenger_metric, cfg.margin, contested, challenger_ref.version)

    at, run_id = time.time(), uuid.uuid4().hex[:8]
    record = {
        "model": job.name, "decision": PENDING if promote else "keep", "reason": reason,
        "metric": METRIC, "margin": cfg.margin, "eval_split": cfg.eval_split, "eval_images": len(held_out),
        "eval_seed": cfg.eval_seed,
        "champion": {"version": champion, "metric": json_number(champion_metric), "load_error": champion_error},
        "challenger": {"version": challenger_ref.version, "metric": json_number(challenger_metric),
                       "warm_started_from": champion if initial is not None else None},
        "dataset": job.dataset, "dataset_manifest_sha256": manifest_digest(manifest),
        "train_job": job_settings(job), "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
        "run_id": run_id, "host": socket.gethostname(), "vaegen_version": __version__,
    }
    record_key = record_decision(registry, job.name, record, run_id, at)     # raises → nothing promoted
    if not promote:
        return RetrainOutcome(False, champion, challenger_ref.version, reason, record_key, record)

    return promote_challenger(registry, record, record_key, challenger_metric, expected)


def read_champion(registry: Registry, name: str) -> tuple[str | None, VAE | None, str | None, str | None]:
    """(champion version, its model, why it could not be read, the version the promotion swap expects)."""
    champion, champion_error, expected = None, None, None
    try:
        pointer = registry.champion(name)
        champion = expected = pointer["version"] if pointer else None
        if pointer:
            finish_promotion_record(registry, name, pointer)
    except CorruptRecord as e:        # replaced like a champion that no longer loads, if it is still corrupt
        champion_error, expected = str(e), CORRUPT_POINTER
    champion_model = None
    if champion:
        try:
            champion_model = registry.load(ModelRef(name, champion)).model
        except VaegenError as e:
            champion_error = str(e)
    return champion, champion_model, champion_error, expected


def promote_challenger(registry: Registry, record: dict, record_key: str, challenger_metric: float,
                       expected: str | None) -> RetrainOutcome:
    """Swap the champion pointer to the challenger (a recorded pending decision), then finish the record."""
    name, champion, challenger = record["model"], record["champion"]["version"], record["challenger"]["version"]
    new_pointer = {"version": challenger, "metric": METRIC, "value": challenger_metric,
                   "promoted_at": record["decided_at"], "decision": record_key.rsplit("/", 1)[-1]}
    if swap_champion(registry, name, new_pointer, expected_version=expected):
        record = {**record, "decision": "promote"}
        rewrite_decision(registry, record_key, record)
        return RetrainOutcome(True, challenger, challenger, record["reason"], record_key, record)
    now = current_champion(registry, name)
    reason = (f"another retrain run changed the champion from {champion} to {now} while this run was deciding; "
              f"{challenger} is not promoted")
    record = {**record, "decision": "keep", "reason": reason, "lost_race": True}
    rewrite_decision(registry, record_key, record)
    return RetrainOutcome(False, now, challenger, reason, record_key, record)


PENDING = "pending"       # a promotion decided and recorded, its compare-and-swap not yet known to have landed


def json_number(value: float | None) -> float | str | None:
    """NaN and ±inf as text: JSON has no such numbers, and a reader must not take them for scores."""
    return value if value is None or math.isfinite(value) else str(value)


def finish_promotion_record(registry: Registry, name: str, pointer: dict) -> None:
    """The champion's own record still "pending" means its run stopped between the swap and the final rewrite:
    the pointer proves the promotion, so say so before this run may replace the pointer."""
    decision = pointer.get("decision")
    if not is_valid_name(decision):
        return
    key = registry.key(name, DECISIONS_DIR, decision)
    if not registry.storage.exists(key):
        return
    try:
        record = json.loads(registry.storage.read_bytes(key))
    except ValueError:
        return
    if isinstance(record, dict) and record.get("decision") == PENDING:
        rewrite_decision(registry, key, {**record, "decision": "promote"})


def current_champion(registry: Registry, name: str) -> str | None:
    try:
        pointer = registry.champion(name)
    except CorruptRecord:
        return None
    return pointer["version"] if pointer else None
