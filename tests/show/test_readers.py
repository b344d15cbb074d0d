"""A Parquet job is read as-is, without glue code, by every reader a user reaches for: Hugging Face `datasets`
given the job folder (features typed, labels named, no label column for an unconditional model), `torchvision.io`,
PIL, Ray Data and pandas given its data/ folder. Its dataset card (README.md) is Hub metadata that round-trips,
and the command in it makes the very same job."""
import io
import os
import shlex

import numpy as np
import pytest
from conftest import start_local_ray
from generate_support import publish_tiny_model
from PIL import Image

from cluster.data.datasets import ingest
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.store.layout import CARD, DATA_DIR, OUTPUTS, JobKeys
from cluster.store.storage import open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_LABELS, ArrayDataset, ArraySplit
from vae_core.use_configs import GenerateConfig

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")     # nothing may reach the network


@pytest.fixture(scope="module")
def jobs(starts_ray, small_fashion, tmp_path_factory):
    """One root: reconstructions (Parquet) of 200 real Fashion-MNIST test images by an unconditional model (the
    dataset's labels and class names), and 40 unconditional samples (Parquet, no labels)."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("readers") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (test_images, test_labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:200], test_labels[:200])},
                                       FASHION_MNIST_LABELS, "test"), shard_rows=100, progress=False)
    publish_tiny_model(storage, "tiny")
    recon = run_reconstruction(GenerateConfig(model="tiny", kind="reconstructions", dataset="fm"), cfg,
                               workers=2, progress=False)
    samples = run_generation(GenerateConfig(model="tiny", count=40, shard_size=20, seed=4), cfg, workers=2,
                             progress=False)
    return cfg, storage, recon, samples


@pytest.fixture(scope="module")
def tar_job(jobs):
    """20 class-conditional samples as WebDataset tars, in the same root."""
    cfg, storage, _, _ = jobs
    publish_tiny_model(storage, "tiny-cond", num_classes=10)
    return run_generation(GenerateConfig(model="tiny-cond", count=20, shard_size=10, format="png", seed=2), cfg,
                          workers=2, progress=False)


def job_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(cfg.root, manifest["prefix"])


def test_hugging_face_datasets_loads_the_job_folder_typed_and_named(jobs):
    import datasets
    cfg, _, recon, samples = jobs
    ds = datasets.load_dataset(job_dir(cfg, recon), split="test")          # the split it reconstructs
    assert ds.num_rows == 200
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == list(FASHION_MNIST_LABELS)
    assert ds.features["latent"].length == 4
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (28, 28)

    unconditional = datasets.load_dataset(job_dir(cfg, samples), split="train")
    assert unconditional.num_rows == 40 and "label" not in unconditional.features
    assert isinstance(unconditional.features["image"], datasets.Image)


def data_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(job_dir(cfg, manifest), DATA_DIR)


def test_pandas_and_ray_data_read_the_data_folder(jobs):
    import pandas as pd
    import ray
    cfg, _, recon, samples = jobs
    for job, rows in ((recon, 200), (samples, 40)):
        df = pd.read_parquet(data_dir(cfg, job))
        assert sorted(df["id"]) == list(range(rows))
        ds = ray.data.read_parquet(data_dir(cfg, job))
        assert ds.count() == rows
    assert "label" in pd.read_parquet(data_dir(cfg, recon)).columns
    assert "label" not in pd.read_parquet(data_dir(cfg, samples)).columns


def test_torchvision_and_pil_decode_the_image_bytes_as_they_are(jobs):
    import pandas as pd
    import torch
    from torchvision.io import decode_image
    cfg, _, recon, _ = jobs
    df = pd.read_parquet(data_dir(cfg, recon)).sort_values("id")
    for cell in df["image"][:5]:
        tensor = decode_image(torch.frombuffer(bytearray(cell["bytes"]), dtype=torch.uint8))
        assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.uint8
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            assert im.format == "PNG" and im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), tensor[0].numpy())


def test_the_gallery_and_every_record_stay_out_of_the_data(jobs):
    """`vaegen show` writes its page into the job folder: data/ still reads as data alone, and beside it are the
    card and records whose names pyarrow's discovery skips."""
    import pandas as pd
    cfg, _, _, samples = jobs
    keys = JobKeys(samples["prefix"])
    assert vaegen(["show", samples["job_id"], "--root", cfg.root]) == 0
    assert os.path.exists(os.path.join(cfg.root, keys.gallery))
    top = sorted(os.listdir(job_dir(cfg, samples)))
    assert [name for name in top if not name.startswith(("_", "."))] == [CARD, DATA_DIR]
    assert len(pd.read_parquet(data_dir(cfg, samples))) == 40


def test_the_card_round_trips_and_says_what_the_hub_expects(jobs):
    from huggingface_hub import DatasetCard
    cfg, _, recon, samples = jobs
    path = os.path.join(job_dir(cfg, recon), CARD)
    card = DatasetCard.load(path)
    again = DatasetCard(str(card))
    assert again.data.to_dict() == card.data.to_dict() and str(again) == str(card)
    data = card.data.to_dict()
    assert data["license"] == "mit"                                 # Fashion-MNIST's, recognised from its manifest
    assert data["source_datasets"] == ["extended|zalando-datasets/fashion_mnist"]
    assert data["size_categories"] == "n<1K" and "image-to-image" in data["task_categories"]
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "test",
                                                                          "path": "data/test-*.parquet"}]}]
    label = next(f for f in data["dataset_info"]["features"] if f["name"] == "label")
    assert list(label["dtype"]["class_label"]["names"].values()) == list(FASHION_MNIST_LABELS)
    unconditional = DatasetCard.load(os.path.join(job_dir(cfg, samples), CARD)).data.to_dict()
    assert "label" not in [f["name"] for f in unconditional["dataset_info"]["features"]]
    assert "unconditional-image-generation" in unconditional["task_categories"]


def test_the_command_in_the_card_makes_the_very_same_job(jobs, capsys):
    """A job made with the real CLI, every identity flag off its default: the card's command names it again."""
    from huggingface_hub import DatasetCard
    cfg, storage, _, _ = jobs
    assert vaegen(["generate", "--model", "tiny", "--count", "30", "--shard-size", "16", "--seed", "9",
                   "--pixels", "mean", "--decode-batch", "8", "--root", cfg.root, "--workers", "1"]) == 0
    first = capsys.readouterr().out
    job_id = first.split(" job ", 1)[1].split()[0]
    card = DatasetCard.load(os.path.join(cfg.root, OUTPUTS, job_id, CARD))
    command = card.text.split("```\nvaegen ", 1)[1].split("\n", 1)[0]
    assert "--pixels mean" in command and "--decode-batch 8" in command
    assert command.endswith(" --root <root>") and cfg.root not in card.text     # the root may move: no path
    command = command.replace("<root>", shlex.quote(cfg.root))
    assert "N(0, I)" in card.text                  # the tiny model has no fitted prior
    before = storage.list_dirs(OUTPUTS)
    manifest = storage.read_bytes(JobKeys.of(job_id).manifest)
    assert vaegen(shlex.split(command)) == 0
    assert f" job {job_id} " in capsys.readouterr().out
    assert storage.list_dirs(OUTPUTS) == before and storage.read_bytes(JobKeys.of(job_id).manifest) == manifest


def test_the_card_does_not_claim_a_standard_normal_prior_for_a_fitted_one():
    from cluster.generate.card import Provenance, RowLayout, dataset_card
    manifest = {"job_id": "samples-00", "kind": "samples", "format": "parquet", "model": "m@v0001",
                "weights_sha256": "ab" * 32, "prefix": "outputs/samples-00", "split": "train",
                "shard_pattern": "data/train-{00000..00001}-of-00002.parquet",
                "totals": {"rows": 20_000, "shards": 2, "bytes": 123}, "created_at": 0.0, "label_names": [],
                "libraries": {"vaegen": "0"}, "image_shape": [1, 28, 28],
                "spec": {"kind": "samples", "model": "m", "count": 20_000, "shard_size": 10_000, "seed": 0,
                         "labels": [], "pixels": "sample", "format": "parquet", "decode_batch": 4096,
                         "dataset": "", "split": "test"}}
    card = dataset_card(manifest, RowLayout(False, 4), Provenance("fm", prior_components=10))
    assert "N(0, I)" not in card.text and "mixture of 10 Gaussians" in card.text
    assert card.data.to_dict()["size_categories"] == "10K<n<100K" and card.data.to_dict()["license"] == "unknown"


def test_class_names_in_the_card_are_text_never_markup():
    from huggingface_hub import DatasetCard

    from cluster.generate.card import Provenance, RowLayout, dataset_card
    names = ["<script>alert(1)</script>", "[click](http://evil.example)", "two\nlines # head", "a|b*c_d`e`", "T-shirt"]
    manifest = {"job_id": "samples-00", "kind": "samples", "format": "parquet", "model": "m@v0001",
                "weights_sha256": "ab" * 32, "prefix": "outputs/samples-00", "split": "train",
                "shard_pattern": "data/train-{00000..00001}-of-00002.parquet",
                "totals": {"rows": 10, "shards": 1, "bytes": 123}, "created_at": 0.0, "label_names": names,
                "libraries": {"vaegen": "0"}, "image_shape": [1, 28, 28],
                "spec": {"kind": "samples", "model": "m", "count": 10, "shard_size": 10, "seed": 0,
                         "labels": [], "pixels": "sample", "format": "parquet", "decode_batch": 8,
                         "dataset": "", "split": "test"}}
    card = dataset_card(manifest, RowLayout(True, 4), Provenance("fm"))
    labels = next(line for line in card.text.splitlines() if line.startswith("- labels:"))
    assert labels == ("- labels: &lt;script&gt;alert\\(1\\)&lt;/script&gt;, \\[click\\]\\(http://evil.example\\), "
                      "two\\\\nlines \\# head, a\\|b\\*c\\_d\\`e\\`, T-shirt")
    assert "<script>" not in card.text and "\ntwo" not in card.text
    features = DatasetCard(str(card)).data.to_dict()["dataset_info"]["features"]
    assert list(next(f for f in features if f["name"] == "label")["dtype"]["class_label"]["names"].values()) == names


def test_the_card_of_a_tar_job_declares_features_that_datasets_reads(jobs, tar_job):
    import datasets
    from huggingface_hub import DatasetCard
    cfg = jobs[0]
    card = DatasetCard.load(os.path.join(job_dir(cfg, tar_job), CARD)).data.to_dict()
    assert card["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.tar"}]
    assert "png" in [f["name"] for f in card["dataset_info"]["features"]]
    ds = datasets.load_dataset(job_dir(cfg, tar_job), split="train")      # the card's features, as declared
    assert ds.num_rows == 20 and isinstance(ds.features["png"], datasets.Image)
    assert isinstance(ds[0]["png"], Image.Image)
    if "cls" in ds.features:                                              # a tar with .cls members
        assert ds.features["cls"].names == [f"class_{i}" for i in range(10)]
        assert sorted(ds["cls"]) == sorted(i % 10 for i in range(20))
