"""A model name means models of one dataset, as a user meets it on the command line: a preset trained on another
dataset gets a name of its own, a version of other data under a bound name is one line suggesting a name, and
`vaegen ls` shows each version's dataset, shape and (once evaluated) NLL."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.data.datasets import ingest
from cluster.store.registry import Registry
from cluster.store.storage import Storage
from jobs.args import train_job_config
from jobs.cli import build_parser
from jobs.cli import main as vaegen
from jobs.config_file import parse_args
from vae_core.data import ArrayDataset, ArraySplit

TINY = ["--epochs", "1", "--max-images", "300", "--hidden-dim", "16", "--latent-dim", "2", "--no-progress"]


@pytest.fixture
def two_datasets(local_storage_config, small_fashion):
    """Fashion-MNIST (1x28x28) and "faces": the same images padded to 3x32x32, as a colour dataset would be."""
    (train_x, train_y), (test_x, test_y) = small_fashion
    storage = Storage(local_storage_config)
    labels = tuple(str(i) for i in range(10))

    def colour(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))).repeat(3, axis=1))
    for name, shape in (("fashion-mnist", lambda x: x), ("faces", colour)):
        splits = {"train": ArraySplit(shape(train_x[:300]), train_y[:300]),
                  "test": ArraySplit(shape(test_x[:50]), test_y[:50])}
        ingest(storage, name, ArrayDataset(splits, labels, "test"), progress=False)
    return ["--root", local_storage_config.root], storage


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_preset_on_another_dataset_gets_its_own_name_and_ls_shows_each_models_data(two_datasets, capsys):
    root, storage = two_datasets
    assert vaegen(["train", "--preset", "mlp-classic", *TINY, *root]) == 0
    assert "published mlp-classic@v0001" in capsys.readouterr().out
    assert vaegen(["train", "--preset", "mlp-classic", "--dataset", "faces", *TINY, *root]) == 0
    assert "published mlp-classic-faces@v0001" in capsys.readouterr().out

    registry = Registry(storage)
    assert registry.versions("mlp-classic") == ["v0001"]                  # the name still means Fashion-MNIST
    assert registry.load("mlp-classic").model.cfg.image_shape == (1, 28, 28)

    assert vaegen(["evaluate", "--model", "mlp-classic", "--k", "2", "--limit", "20", "--no-quality",
                   "--no-progress", *root]) == 0
    capsys.readouterr()
    assert vaegen(["ls", root[1]]) == 0
    rows = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines() if "@v0" in line}
    fashion, faces = rows["mlp-classic@v0001"], rows["mlp-classic-faces@v0001"]
    assert fashion[0] == "*" and fashion[2:4] == ["fashion-mnist", "1x28x28"]
    assert faces[2:4] == ["faces", "3x32x32"] and faces[-1] == "-"          # not evaluated: no NLL
    nll = registry.metrics(registry.resolve("mlp-classic"))["evaluation"]["nll"]
    assert fashion[-1] == f"{nll:.2f}" != "-"


def test_a_version_of_another_dataset_under_a_bound_name_is_refused_before_training(two_datasets, capsys):
    root, storage = two_datasets
    assert vaegen(["train", "--name", "m", *TINY, *root]) == 0
    runs = storage.list_dirs("train-runs")
    assert vaegen(["train", "--name", "m", "--dataset", "faces", *TINY, *root]) == 2
    line = one_error_line(capsys)
    assert "model name 'm' is bound to 'fashion-mnist', 1x28x28 images" in line
    assert line.endswith("e.g. --name m-faces")
    assert storage.list_dirs("train-runs") == runs and Registry(storage).versions("m") == ["v0001"]


def test_a_preset_keeps_its_name_on_its_own_dataset_and_a_given_name_wins():
    def name_of(*argv: str) -> str:
        return train_job_config(parse_args(build_parser(), ["train", *argv])).name
    assert name_of("--preset", "fmnist-best") == "fmnist-best"
    assert name_of("--preset", "fmnist-best", "--dataset", "fm-small") == "fmnist-best-fm-small"
    assert name_of("--preset", "mlp-classic", "--dataset", "faces", "--name", "mine") == "mine"
    assert name_of("--dataset", "faces") == "faces-mlp"                    # without a preset: <dataset>-<arch>
