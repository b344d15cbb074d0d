"""`vaegen train` without --run-id is one run per (settings, seed, dataset generation): the same command twice
publishes once and says which version it made, an interrupted one resumes; another seed or a re-ingested dataset
is another run, and --run-id keeps its meaning. Real Fashion-MNIST bytes on a real local root, tiny training."""
from __future__ import annotations

import pytest

import cluster.train.driver
from cluster.data.datasets import ingest
from cluster.store.registry import Registry
from cluster.store.storage import Storage
from cluster.train.runs import RUNS_DIR
from jobs.cli import main as vaegen
from vae_core.data import ArrayDataset, ArraySplit

TINY = ["--epochs", "2", "--max-images", "300", "--hidden-dim", "16", "--latent-dim", "2", "--no-progress"]


@pytest.fixture
def fashion(local_storage_config, small_fashion):
    """ingest(rows): Fashion-MNIST's first `rows` training images as dataset "fm" (a new generation when the rows
    change); returns the root's flags and the storage."""
    (train_x, train_y), (test_x, test_y) = small_fashion
    storage = Storage(local_storage_config)

    def ingest_rows(rows: int = 300) -> None:
        splits = {"train": ArraySplit(train_x[:rows], train_y[:rows]), "test": ArraySplit(test_x[:50], test_y[:50])}
        ingest(storage, "fm", ArrayDataset(splits, tuple(str(i) for i in range(10)), "test"), progress=False)
    ingest_rows()
    return ["--dataset", "fm", "--name", "m", "--root", local_storage_config.root], storage, ingest_rows


def train(flags: list[str], *extra: str) -> int:
    return vaegen(["train", *flags, *TINY, *extra])


def test_the_same_command_twice_publishes_once_and_names_the_version_it_made(fashion, capsys):
    flags, storage, _ = fashion
    assert train(flags) == 0
    first = capsys.readouterr().out
    assert "published m@v0001" in first
    assert train(flags) == 0
    again = capsys.readouterr().out.strip()
    assert again.startswith("model m@v0001 already trained by this exact command: run m-")
    assert "another --seed or --run-id trains again" in again and "\n" not in again
    assert Registry(storage).versions("m") == ["v0001"] and len(storage.list_dirs(RUNS_DIR)) == 1
    run_id = storage.list_dirs(RUNS_DIR)[0]
    assert f"run {run_id}:" in first and f"run {run_id} (" in again        # the id the first run printed


def test_another_seed_or_a_reingested_dataset_is_another_run(fashion, capsys):
    flags, storage, ingest_rows = fashion
    assert train(flags) == 0
    assert train(flags, "--seed", "1") == 0                                  # another seed: new weights
    ingest_rows(250)                                                         # the dataset changed
    assert train(flags) == 0
    assert train(flags) == 0                                                 # ...and this is its run now
    out = capsys.readouterr().out
    assert [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("published")] == [
        "m@v0001", "m@v0002", "m@v0003"]
    assert "model m@v0003 already trained" in out
    assert Registry(storage).versions("m") == ["v0001", "v0002", "v0003"]


def test_an_explicit_run_id_keeps_its_meaning(fashion, capsys):
    flags, storage, _ = fashion
    assert train(flags, "--run-id", "r1") == 0
    assert train(flags, "--run-id", "r1") == 0
    assert "run r1 finished before: model m@v0001" in capsys.readouterr().out
    assert train(flags, "--run-id", "r2") == 0                               # the same settings, a new id: trains
    assert "published m@v0002" in capsys.readouterr().out
    assert sorted(storage.list_dirs(RUNS_DIR)) == ["r1", "r2"]


class Crash(BaseException):
    """The driver dying after training, before its publish (not an Exception: nothing in vaegen catches it)."""


def test_an_interrupted_command_resumes_from_its_checkpoint_when_run_again(fashion, monkeypatch, capsys):
    flags, storage, _ = fashion

    def dies(*args, **kwargs):
        raise Crash()
    real_publish = cluster.train.driver.publish_trained_model
    monkeypatch.setattr(cluster.train.driver, "publish_trained_model", dies)
    with pytest.raises(Crash):
        train(flags)
    assert Registry(storage).versions("m") == [] and len(storage.list_dirs(RUNS_DIR)) == 1

    monkeypatch.setattr(cluster.train.driver, "publish_trained_model", real_publish)
    assert train(flags) == 0
    assert "published m@v0001" in capsys.readouterr().out
    summary = Registry(storage).metrics(Registry(storage).resolve("m"))
    assert summary["resumed_at_epochs"] == [0, 2]                    # from the last checkpoint, not from scratch
    assert len(storage.list_dirs(RUNS_DIR)) == 1
