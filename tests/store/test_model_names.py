"""A model name holds versions of one dataset and image shape (models/<name>/dataset.json): a version of other data
under it is one line suggesting a name, and nothing is published. Real storage (a local root and S3 over HTTP via
moto), real model files."""
from __future__ import annotations

import json

import pytest
from threads import all_at_once

from cluster.store.name_binding import BINDING_FILE
from cluster.store.records import CorruptRecord
from cluster.store.registry import Registry
from cluster.store.storage import Storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig
from vae_core.errors import VaegenError
from vae_core.models import build_model


def trained_on(dataset: str, shape: tuple[int, int, int] = (1, 28, 28)) -> dict[str, bytes]:
    """A version's files as a training run writes them: config.json names the dataset it was trained on."""
    model = build_model(ModelConfig(image_shape=shape, hidden_dim=8, latent_dim=2))
    return checkpoint_files(model, {"train_job": {"dataset": dataset}})


def test_a_version_of_another_dataset_is_one_line_suggesting_a_name_and_publishes_nothing(storage_config):
    registry = Registry(Storage(storage_config))
    assert registry.publish("mlp-classic", trained_on("fashion-mnist")).version == "v0001"
    bound = json.loads(registry.storage.read_bytes(f"models/mlp-classic/{BINDING_FILE}"))
    assert bound == {"format_version": 1, "dataset": "fashion-mnist", "image_shape": [1, 28, 28]}

    with pytest.raises(VaegenError) as refused:
        registry.publish("mlp-classic", trained_on("faces", (3, 32, 32)))
    line = str(refused.value)
    assert "\n" not in line and "'fashion-mnist', 1x28x28" in line and "'faces', 3x32x32" in line
    assert line.endswith("--name mlp-classic-faces")
    # Nothing claimed, nothing published: the name still means the Fashion-MNIST model.
    assert [d for d in registry.storage.list_dirs("models/mlp-classic") if d.startswith("v")] == ["v0001"]
    assert registry.resolve("mlp-classic") == registry.resolve("mlp-classic@latest")

    assert registry.publish("mlp-classic-faces", trained_on("faces", (3, 32, 32))).version == "v0001"
    assert registry.publish("mlp-classic", trained_on("fashion-mnist")).version == "v0002"


def test_the_same_dataset_at_another_shape_is_refused_too(local_storage_config):
    """A dataset re-ingested at another size: its models cannot be compared with the name's champion."""
    registry = Registry(Storage(local_storage_config))
    registry.publish("faces-mlp", trained_on("faces", (3, 32, 32)))
    with pytest.raises(VaegenError, match=r"'faces', 3x64x64 images: .* --name faces-mlp-3x64x64$"):
        registry.publish("faces-mlp", trained_on("faces", (3, 64, 64)))


def test_first_publishes_of_two_datasets_at_once_bind_the_name_to_one(storage_config):
    registry = Registry(Storage(storage_config))

    def publish(i: int) -> str:
        try:
            return str(registry.publish("m", trained_on("a" if i % 2 else "b")))
        except VaegenError as e:
            return f"refused: {e}"
    outcomes = all_at_once(6, publish)
    winner = json.loads(registry.storage.read_bytes(f"models/m/{BINDING_FILE}"))["dataset"]
    published = [o for o in outcomes if not o.startswith("refused")]
    assert len(published) == 3 and len(registry.versions("m")) == 3
    assert all(f"bound to {winner!r}" in o for o in outcomes if o.startswith("refused"))
    for version in registry.versions("m"):
        assert registry.config(registry.resolve(f"m@{version}"))["train_job"]["dataset"] == winner


class ListingAfterAnotherFirstPublish(Storage):
    """A root where another process binds `name` to `dataset` and claims its first version at the moment this one
    lists the name's folder: the interleaving that the concurrent test above meets by chance, made certain."""

    def __init__(self, cfg, name: str, dataset: str):
        super().__init__(cfg)
        self.other = (name, dataset)

    def list_dirs(self, prefix: str) -> list[str]:
        if self.other and prefix == f"models/{self.other[0]}":
            name, dataset = self.other
            self.other = None
            Registry(Storage(self.cfg)).publish(name, trained_on(dataset))
        return super().list_dirs(prefix)


def test_a_first_publish_that_lands_while_another_checks_the_name_is_seen_as_the_binding(local_storage_config):
    refused = Registry(ListingAfterAnotherFirstPublish(local_storage_config, "m", "a"))
    with pytest.raises(VaegenError, match=r"model name 'm' is bound to 'a'"):
        refused.publish("m", trained_on("b"))
    same = Registry(ListingAfterAnotherFirstPublish(local_storage_config, "n", "a"))
    assert same.publish("n", trained_on("a")).version == "v0002"
    assert same.versions("n") == ["v0001", "v0002"]


def test_a_name_published_by_an_earlier_vaegen_is_refused_in_one_line(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    registry.publish("old", trained_on("fashion-mnist"))
    registry.storage.delete(f"models/old/{BINDING_FILE}")          # as an earlier vaegen left the name
    with pytest.raises(VaegenError, match=r"earlier vaegen.*train under a new --name$"):
        registry.publish("old", trained_on("fashion-mnist"))
    assert registry.versions("old") == ["v0001"]
    assert registry.resolve("old").version == "v0001"                   # still readable


@pytest.mark.parametrize("body, problem", [
    (b'{"format_version": 2, "dataset": "fm", "image_shape": [1, 28, 28]}', "is in another format"),
    (b'{"format_version": 1, "dataset": "../x", "image_shape": [1, 28, 28]}', "not a dataset name"),
    (b'{"format_version": 1, "dataset": "fm", "image_shape": "1x28x28"}', "is corrupt"),
    (b'{"format_vers', "is corrupt (not valid JSON"),
])
def test_a_binding_vaegen_did_not_write_is_one_line_naming_the_file(local_storage_config, body, problem):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", trained_on("fm"))
    registry.storage.publish(f"models/m/{BINDING_FILE}", body)
    with pytest.raises(CorruptRecord) as e:
        registry.publish("m", trained_on("fm"))
    assert problem in str(e.value) and f"m/{BINDING_FILE}" in e.value.uri and "\n" not in str(e.value)
