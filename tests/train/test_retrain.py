"""`vaegen retrain`: champion/challenger on real Fashion-MNIST bytes, on a local root and on S3 over HTTP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from threads import all_at_once

import cluster.train.retrain
from cluster.data.datasets import ingest
from cluster.store.layout import JobKeys
from cluster.store.registry import Registry, decisions, swap_champion
from cluster.store.storage import Storage
from cluster.train.retrain import decide
from jobs.cli import main
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.models import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = ["--epochs", "1", "--max-images", "600", "--hidden-dim", "64", "--latent-dim", "4",
        "--eval-max-images", "300", "--no-progress"]


@pytest.fixture
def tiny_dataset(small_fashion):
    """A real Fashion-MNIST slice with a train and a test split, ingested on the given root."""
    (train_x, train_y), (test_x, test_y) = small_fashion

    def make(cfg: StorageConfig, name: str = "fm", with_test: bool = True) -> str:
        splits = {"train": ArraySplit(train_x[:600], train_y[:600])}
        if with_test:
            splits["test"] = ArraySplit(test_x[:300], test_y[:300])
        ingest(Storage(cfg), name, ArrayDataset(splits, tuple(str(i) for i in range(10)), "test"), progress=False)
        return name
    return make


def storage_flags(cfg: StorageConfig) -> list[str]:
    return ["--root", cfg.root] + (["--s3-endpoint", cfg.s3_endpoint] if cfg.s3_endpoint else [])


def retrain_cli(cfg: StorageConfig, *extra: str) -> int:
    return main(["retrain", "--dataset", "fm", "--name", "fm-vae", *storage_flags(cfg), *TINY, *extra])


def test_first_run_promotes_then_a_worse_challenger_is_kept_out(storage_config, tiny_dataset, capsys):
    tiny_dataset(storage_config)
    registry = Registry(Storage(storage_config))

    assert retrain_cli(storage_config) == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert registry.champion("fm-vae")["version"] == "v0001"
    assert registry.resolve("fm-vae@champion").version == "v0001"

    # A challenger made worse on purpose: one epoch at a learning rate too small to learn anything.
    assert retrain_cli(storage_config, "--lr", "1e-7") == 0
    assert "kept the champion" in capsys.readouterr().out
    assert registry.champion("fm-vae")["version"] == "v0001"

    crowned, first, second = decisions(registry, "fm-vae")
    # The challenger was the name's first version: crowned at its publish, then promoted by the retrain too.
    assert crowned["rule"] == "first-version" and crowned["decision"] == "promote"
    assert crowned["challenger"]["version"] == "v0001"
    assert first["decision"] == "promote" and "no champion yet" in first["reason"]
    assert first["champion"]["version"] is None and first["challenger"]["version"] == "v0001"
    assert second["decision"] == "keep" and "worse than champion v0001" in second["reason"]
    assert second["challenger"]["metric"] > second["champion"]["metric"]
    assert second["dataset_manifest_sha256"] == first["dataset_manifest_sha256"]
    assert second["champion"]["version"] == "v0001" and second["challenger"]["version"] == "v0002"


@pytest.mark.slow
def test_retrain_on_two_ray_workers_promotes_a_better_challenger_and_keeps_out_a_worse_one(local_storage_config,
                                                                                          tiny_dataset, ray_local,
                                                                                          capsys):
    """The challenger trains on Ray Train (the same backend flags as `vaegen train`). A weak champion first (one
    process, a learning rate too small to learn), then a real challenger on 2 workers wins, then a weak one on
    2 workers is kept out."""
    tiny_dataset(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    assert retrain_cli(local_storage_config, "--lr", "1e-7") == 0
    assert registry.champion("fm-vae")["version"] == "v0001"
    capsys.readouterr()

    assert retrain_cli(local_storage_config, "--workers", "2", "--epochs", "2") == 0
    assert "PROMOTED" in capsys.readouterr().out
    assert registry.champion("fm-vae")["version"] == "v0002"
    assert retrain_cli(local_storage_config, "--workers", "2", "--lr", "1e-7") == 0
    assert "kept the champion" in capsys.readouterr().out
    assert registry.champion("fm-vae")["version"] == "v0002"

    crowned, _, better, worse = decisions(registry, "fm-vae")         # v0001 crowned at publish, then its retrain
    assert crowned["rule"] == "first-version" and crowned["challenger"]["version"] == "v0001"
    assert better["decision"] == "promote" and "beats champion v0001" in better["reason"]
    assert worse["decision"] == "keep" and "worse than champion v0002" in worse["reason"]
    for record, version in ((better, "v0002"), (worse, "v0003")):
        assert record["train_job"]["ray"]["workers"] == 2 and record["challenger"]["version"] == version
        assert registry.metrics(registry.resolve(f"fm-vae@{version}"))["workers"] == 2


def test_margin_keeps_a_slightly_better_challenger_and_warm_start_uses_the_champion(local_storage_config,
                                                                                     tiny_dataset, capsys):
    tiny_dataset(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    assert retrain_cli(local_storage_config) == 0
    # Warm-started from the champion and trained one more epoch: better, but not by 1000 nats/image.
    assert retrain_cli(local_storage_config, "--warm-start", "--margin", "1000") == 0
    record = decisions(registry, "fm-vae")[-1]
    assert record["challenger"]["warm_started_from"] == "v0001"
    assert record["decision"] == "keep" and "margin 1000" in record["reason"]
    assert registry.champion("fm-vae")["version"] == "v0001"


def test_a_champion_that_no_longer_loads_is_replaced_and_the_record_says_why(local_storage_config, tiny_dataset):
    tiny_dataset(local_storage_config)
    assert retrain_cli(local_storage_config) == 0
    weights = Path(local_storage_config.root) / "models" / "fm-vae" / "v0001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))          # corrupted on storage
    assert retrain_cli(local_storage_config) == 0
    registry = Registry(Storage(local_storage_config))
    record = decisions(registry, "fm-vae")[-1]
    assert record["decision"] == "promote" and "could not be scored" in record["reason"]
    assert "sha256" in record["champion"]["load_error"]
    assert registry.champion("fm-vae")["version"] == "v0002"


def test_compare_and_swap_lets_exactly_one_racer_promote(storage_config, tiny_dataset):
    """Eight threads race to replace the same champion: exactly one swap lands, the pointer stays whole."""
    registry = Registry(Storage(storage_config))
    assert swap_champion(registry, "m", {"version": "v0001"}, expected_version=None)
    results = all_at_once(8, lambda i: swap_champion(registry, "m", {"version": f"v{i + 2:04d}", "pad": "x" * 4096},
                                                     expected_version="v0001"))
    assert results.count(True) == 1
    pointer = registry.champion("m")                       # parses: never half-written
    assert pointer["version"] != "v0001" and pointer["pad"] == "x" * 4096
    assert not swap_champion(registry, "m", {"version": "v0099"}, expected_version="v0001")   # stale view


@pytest.mark.slow
def test_two_concurrent_retrain_processes_promote_at_most_once(local_storage_config, tiny_dataset):
    tiny_dataset(local_storage_config)
    cmd = [sys.executable, "-m", "jobs.cli", "retrain", "--dataset", "fm", "--name", "fm-vae",
           *storage_flags(local_storage_config), *TINY, "--margin", "5"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    registry = Registry(Storage(local_storage_config))
    records = decisions(registry, "fm-vae")
    promoted = [r for r in records if r["decision"] == "promote"]
    contest = [r for r in records if r.get("rule") != "first-version"]
    assert len(contest) == 2 and len([r for r in contest if r["decision"] == "promote"]) <= 1
    assert registry.champion("fm-vae")["version"] == promoted[-1]["challenger"]["version"]
    promoted_records_agree_with_the_pointer(registry, "fm-vae")
    loser = next(r for r in records if r["decision"] == "keep")
    assert loser.get("lost_race") or "margin" in loser["reason"] or "worse" in loser["reason"]


def test_decision_record_that_cannot_be_written_promotes_nothing(local_storage_config, tiny_dataset, capsys):
    tiny_dataset(local_storage_config)
    models = Path(local_storage_config.root) / "models" / "fm-vae"
    models.mkdir(parents=True)
    (models / "decisions").write_text("a file where the decisions folder should be")
    assert retrain_cli(local_storage_config) == 2
    err = capsys.readouterr().err
    assert "cannot write the decision record" in err and "nothing was promoted" in err
    assert Registry(Storage(local_storage_config)).champion("fm-vae") is None


def test_retrain_with_no_dataset_is_one_clear_error(local_storage_config, capsys):
    assert retrain_cli(local_storage_config) == 2
    assert "no dataset 'fm'" in capsys.readouterr().err


def test_retrain_needs_a_held_out_split(local_storage_config, tiny_dataset, capsys):
    tiny_dataset(local_storage_config, with_test=False)
    assert retrain_cli(local_storage_config) == 2
    assert "no held-out split 'test'" in capsys.readouterr().err


def test_s3_root_without_credentials_is_one_clear_error(s3_storage_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(REPO), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "retrain", "--dataset", "fm",
                          *storage_flags(s3_storage_config)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "vaegen: error: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"]


def test_a_promotion_then_generates_with_the_new_champion(local_storage_config, tiny_dataset, ray_local):
    tiny_dataset(local_storage_config)
    assert retrain_cli(local_storage_config, "--then-generate", "300") == 0
    storage = Storage(local_storage_config)
    champion = Registry(storage).champion("fm-vae")["version"]
    jobs = [d for d in storage.list_dirs("outputs")]
    keys = JobKeys.of(jobs[0])
    assert len(jobs) == 1 and storage.exists(keys.success)
    manifest = json.loads(storage.read_bytes(keys.manifest))
    assert manifest["totals"]["rows"] == 300 and manifest["model"] == f"fm-vae@{champion}"


# -- never a NaN champion, never a "promote" record for a challenger that was not promoted -----------------
NAN, INF = float("nan"), float("inf")


class Crash(BaseException):
    """The retrain process dying at this point (not an Exception: nothing in vaegen catches it)."""


@pytest.mark.parametrize("champion_metric, challenger_metric, champion, promoted", [
    (None, NAN, None, False),             # a first challenger scored NaN is not promoted
    (None, INF, None, False),
    (None, 250.0, None, True),
    (300.0, NAN, "v0001", False),         # NaN compares false both ways: never a "win" either
    (300.0, -INF, "v0001", False),
    (NAN, 250.0, "v0001", True),          # a NaN champion loses to any finite challenger...
    (INF, 250.0, "v0001", True),
    (NAN, NAN, "v0001", False),           # ...but not to another NaN
    (None, NAN, "v0001", False),          # a champion that did not load does not let a NaN through
    (300.0, 250.0, "v0001", True),
    (300.0, 299.0, "v0001", False),       # inside the margin
])
def test_only_a_finite_score_can_win(champion_metric, challenger_metric, champion, promoted):
    assert decide(champion_metric, challenger_metric, 5.0, champion, "v0002")[0] is promoted


def promoted_records_agree_with_the_pointer(registry: Registry, name: str) -> None:
    """The records' promotions end at the pointer: "promote" records plus a "pending" one that champion.json
    names (its run stopped between the swap and the final rewrite); a "pending" record the pointer does not
    name was never promoted."""
    pointer = registry.champion(name)
    named = pointer.get("decision", "") if pointer else ""
    promoted = [r["challenger"]["version"] for r in decisions(registry, name)
                if r["decision"] == "promote" or (r["decision"] == "pending" and r["run_id"] in named)]
    assert (pointer["version"] if pointer else None) == (promoted[-1] if promoted else None), (promoted, pointer)


def test_a_challenger_that_scores_nan_is_not_promoted(local_storage_config, tiny_dataset, monkeypatch, capsys):
    tiny_dataset(local_storage_config)
    assert retrain_cli(local_storage_config) == 0                      # v0001: the champion
    monkeypatch.setattr(cluster.train.retrain, "score", lambda model, images, cfg: NAN)
    assert retrain_cli(local_storage_config) == 0
    assert "kept the champion" in capsys.readouterr().out
    registry = Registry(Storage(local_storage_config))
    assert registry.champion("fm-vae")["version"] == "v0001"
    record = decisions(registry, "fm-vae")[-1]
    assert record["decision"] == "keep" and "not a finite number" in record["reason"]
    assert record["challenger"]["metric"] == "nan"                     # text: JSON has no NaN
    promoted_records_agree_with_the_pointer(registry, "fm-vae")


def test_a_champion_that_scores_nan_loses_to_a_finite_challenger(local_storage_config, tiny_dataset):
    tiny_dataset(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    broken = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=4))
    with torch.no_grad():
        next(broken.parameters()).fill_(NAN)                       # loads fine, scores NaN
    nan_ref = registry.publish("fm-vae", checkpoint_files(broken, {"train_job": {"dataset": "fm"}}))
    assert swap_champion(registry, "fm-vae", {"version": nan_ref.version}, expected_version=None)

    assert retrain_cli(local_storage_config) == 0
    record = decisions(registry, "fm-vae")[-1]
    assert record["champion"]["metric"] == "nan" and "not a finite number" in record["reason"]
    assert record["decision"] == "promote"
    champion = registry.champion("fm-vae")
    assert champion["version"] == record["challenger"]["version"] != nan_ref.version
    assert math.isfinite(champion["value"])


def test_a_crash_before_the_swap_leaves_no_promote_record(local_storage_config, tiny_dataset, monkeypatch):
    tiny_dataset(local_storage_config)

    def dies(*args, **kwargs):
        raise Crash()
    monkeypatch.setattr(cluster.train.retrain, "swap_champion", dies)
    with pytest.raises(Crash):
        retrain_cli(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    # The challenger, the name's first version, was crowned at its publish; the retrain's own promotion never
    # reached the swap, so its record stays "pending" and the pointer does not name it.
    crowned, pending = decisions(registry, "fm-vae")
    assert crowned["rule"] == "first-version" and pending["decision"] == "pending"
    assert registry.champion("fm-vae")["decision"] != "" and pending["run_id"] not in registry.champion("fm-vae")[
        "decision"]
    promoted_records_agree_with_the_pointer(registry, "fm-vae")


def test_a_crash_after_the_swap_is_recorded_as_a_promotion_by_the_next_run(local_storage_config, tiny_dataset,
                                                                          monkeypatch):
    tiny_dataset(local_storage_config)
    real_rewrite = cluster.train.retrain.rewrite_decision

    def dies(*args, **kwargs):
        raise Crash()
    monkeypatch.setattr(cluster.train.retrain, "rewrite_decision", dies)
    with pytest.raises(Crash):
        retrain_cli(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    assert registry.champion("fm-vae")["version"] == "v0001"
    promoted_records_agree_with_the_pointer(registry, "fm-vae")        # "pending", named by the pointer

    monkeypatch.setattr(cluster.train.retrain, "rewrite_decision", real_rewrite)
    assert retrain_cli(local_storage_config, "--lr", "1e-7") == 0      # a worse challenger: kept out
    crowned, first, second = decisions(registry, "fm-vae")
    assert crowned["rule"] == "first-version" and first["decision"] == "promote" and second["decision"] == "keep"
    promoted_records_agree_with_the_pointer(registry, "fm-vae")


def test_two_retrains_racing_at_the_swap_promote_exactly_once(storage_config, tiny_dataset, monkeypatch):
    """Both runs find no champion and decide to promote; a barrier makes both reach the compare-and-swap
    together. One lands; the other's record says it lost the race."""
    tiny_dataset(storage_config)
    real_swap = cluster.train.retrain.swap_champion
    at_the_swap = threading.Barrier(2, timeout=600)

    def swap_together(*args, **kwargs):
        at_the_swap.wait()
        return real_swap(*args, **kwargs)
    monkeypatch.setattr(cluster.train.retrain, "swap_champion", swap_together)
    codes: list[int] = []
    runs = [threading.Thread(target=lambda: codes.append(retrain_cli(storage_config))) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert codes == [0, 0]
    registry = Registry(Storage(storage_config))
    records = [r for r in decisions(registry, "fm-vae") if r.get("rule") != "first-version"]
    assert sorted(r["decision"] for r in records) == ["keep", "promote"]
    loser = next(r for r in records if r["decision"] == "keep")
    assert loser["lost_race"] and "not promoted" in loser["reason"]
    champion = registry.champion("fm-vae")
    assert champion["version"] == next(r for r in records if r["decision"] == "promote")["challenger"]["version"]
    assert math.isfinite(champion["value"])
    assert registry.versions("fm-vae") == ["v0001", "v0002"]           # two challengers, two versions
    promoted_records_agree_with_the_pointer(registry, "fm-vae")


def test_a_corrupt_champion_pointer_is_replaced_and_the_record_says_why(local_storage_config, tiny_dataset):
    tiny_dataset(local_storage_config)
    registry = Registry(Storage(local_storage_config))
    assert retrain_cli(local_storage_config) == 0
    registry.storage.publish("models/fm-vae/champion.json", b'{"version": "v00')          # truncated
    assert retrain_cli(local_storage_config) == 0
    record = decisions(registry, "fm-vae")[-1]
    assert record["decision"] == "promote" and "unreadable champion.json" in record["reason"]
    assert "champion.json is corrupt (not valid JSON" in record["champion"]["load_error"]
    assert registry.champion("fm-vae")["version"] == "v0002"
    promoted_records_agree_with_the_pointer(registry, "fm-vae")
