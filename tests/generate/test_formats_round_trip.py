"""Every output format round-trips through every reader: a job of each format (parquet, png, jpeg), kind (samples,
reconstructions) and model (conditional, unconditional) is shown by `vaegen show`, listed as finished by
`vaegen ls`, and loaded by Hugging Face `datasets` and, for the tar formats, by `webdataset`, all given the job
folder (or its shard pattern) as it is."""
import os

import numpy as np
import pytest
from conftest import start_local_ray, vaegen_in_a_fresh_process
from generate_support import IMAGE_SHAPE, publish_tiny_model, shard_objects

from cluster.data.datasets import ingest
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.generate.writers import read_shard_rows
from cluster.store.layout import JobKeys
from cluster.store.storage import open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_LABELS, ArrayDataset, ArraySplit
from vae_core.use_configs import GenerateConfig

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")     # nothing may reach the network

ROWS, SHARD_ROWS = 8, 4
FORMATS = ("parquet", "png", "jpeg")
IMAGE_MEMBER = {"png": "png", "jpeg": "jpg"}                       # a tar format's image member extension
CASES = [(fmt, kind, model) for fmt in FORMATS for kind in ("samples", "reconstructions")
         for model in ("conditional", "unconditional")]
CASE_IDS = ["-".join(case) for case in CASES]


def labelled(kind: str, model: str) -> bool:
    """Samples carry labels when the model is conditional; reconstructions always carry their input's."""
    return kind == "reconstructions" or model == "conditional"


@pytest.fixture(scope="module")
def jobs(starts_ray, small_fashion, tmp_path_factory):
    """One local root with a 2-shard dataset of real Fashion-MNIST test images, a conditional and an
    unconditional tiny model, and one finished job of every case in CASES: {case: manifest}."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("round-trip") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (test_images, test_labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:ROWS], test_labels[:ROWS])},
                                       FASHION_MNIST_LABELS, "test"), shard_rows=SHARD_ROWS, progress=False)
    models = {"conditional": publish_tiny_model(storage, "cond", num_classes=10),
              "unconditional": publish_tiny_model(storage, "plain")}
    made = {}
    for fmt, kind, model in CASES:
        if kind == "samples":
            spec = GenerateConfig(model=models[model], count=ROWS, shard_size=SHARD_ROWS, format=fmt)
            made[fmt, kind, model] = run_generation(spec, cfg, workers=1, progress=False)
        else:
            spec = GenerateConfig(model=models[model], kind=kind, dataset="fm", format=fmt)
            made[fmt, kind, model] = run_reconstruction(spec, cfg, workers=1, progress=False)
    return cfg, storage, made


def job_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(cfg.root, manifest["prefix"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_shard_reads_back_as_the_rows_it_holds(jobs, case):
    _, storage, made = jobs
    fmt, kind, model = case
    for data in shard_objects(storage, made[case]).values():
        rows = read_shard_rows(data, fmt)
        assert len(rows.ids) == SHARD_ROWS and rows.images.shape == (SHARD_ROWS, *IMAGE_SHAPE)
        assert rows.images.dtype == np.uint8
        assert (rows.labels is not None) == labelled(kind, model)


def job_rows(storage, manifest: dict):
    """ids, labels and images of every shard of a job, concatenated in shard order."""
    shards = [read_shard_rows(data, manifest["format"]) for data in shard_objects(storage, manifest).values()]
    labels = None if shards[0].labels is None else np.concatenate([rows.labels for rows in shards])
    return np.concatenate([rows.ids for rows in shards]), labels, np.concatenate([rows.images for rows in shards])


@pytest.mark.parametrize("kind", ["samples", "reconstructions"])
@pytest.mark.parametrize("model", ["conditional", "unconditional"])
def test_the_same_rows_read_back_from_every_format(jobs, kind, model):
    _, storage, made = jobs
    ids, labels, images = job_rows(storage, made["parquet", kind, model])
    assert ids.tolist() == list(range(ROWS))
    png_ids, png_labels, png_images = job_rows(storage, made["png", kind, model])
    jpeg_ids, jpeg_labels, jpeg_images = job_rows(storage, made["jpeg", kind, model])
    assert png_ids.tolist() == jpeg_ids.tolist() == ids.tolist()
    assert (labels is None and png_labels is None and jpeg_labels is None) or (
        labels.tolist() == png_labels.tolist() == jpeg_labels.tolist())
    assert np.array_equal(png_images, images)                         # both lossless: the very same pixels
    error = np.abs(jpeg_images.astype(np.int16) - images).mean()
    assert jpeg_images.shape == images.shape and error < 8            # lossy, but the same images


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vaegen_show_writes_the_gallery_of_every_job(jobs, case, capsys):
    cfg, _, made = jobs
    manifest = made[case]
    assert vaegen(["show", manifest["job_id"], "--root", cfg.root]) == 0
    assert f"{ROWS} images in 2 of 2 shards" in capsys.readouterr().out
    with open(os.path.join(cfg.root, JobKeys.of(manifest["job_id"]).gallery)) as f:
        page = f.read()
    assert page.count('alt="id ') == ROWS                         # every row of both shards on a contact sheet


@pytest.mark.parametrize("fmt", FORMATS)
def test_vaegen_show_reads_every_format_without_importing_torch(jobs, fmt):
    """A gallery needs the shards' bytes and the model version's files, not the model code: `show` starts in under a
    second instead of the seconds torch takes to import."""
    cfg, _, made = jobs
    manifest = made[fmt, "reconstructions", "conditional"]
    status, imported, stderr = vaegen_in_a_fresh_process(["show", manifest["job_id"], "--root", cfg.root])
    assert (status, imported) == (0, []), stderr[-2000:]


def test_vaegen_ls_lists_every_job_as_finished(jobs, capsys):
    cfg, _, made = jobs
    assert vaegen(["ls", "--root", cfg.root]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    listed = {fields[0]: fields[1] for fields in rows if len(fields) > 1}         # JOB, STATE, ...
    assert {listed.get(manifest["job_id"]) for manifest in made.values()} == {"finished"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hugging_face_datasets_loads_every_job_folder(jobs, small_fashion, case):
    import datasets
    cfg, _, made = jobs
    fmt, kind, model = case
    input_labels = small_fashion[1][1][:ROWS]
    split = made[case]["split"]
    assert split == ("test" if kind == "reconstructions" else "train")      # reconstructions of the test split
    ds = datasets.load_dataset(job_dir(cfg, made[case]), split=split)
    assert ds.num_rows == ROWS
    label_column = "label" if fmt == "parquet" else "cls"
    assert (label_column in ds.features) == labelled(kind, model)
    if kind == "reconstructions":                                  # the input's labels, row for row
        assert dict(zip(ds["id"] if fmt == "parquet" else [meta["id"] for meta in ds["json"]], ds[label_column])) \
            == dict(enumerate(input_labels.tolist()))


@pytest.mark.parametrize("case", [case for case in CASES if case[0] != "parquet"],
                         ids=[i for i, case in zip(CASE_IDS, CASES) if case[0] != "parquet"])
def test_webdataset_reads_every_tar_job(jobs, case):
    import webdataset as wds
    cfg, _, made = jobs
    fmt, kind, model = case
    url = os.path.join(job_dir(cfg, made[case]), made[case]["shard_pattern"])
    rows = list(wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple(IMAGE_MEMBER[fmt], "json"))
    assert len(rows) == ROWS
    assert sorted(meta["id"] for _, meta in rows) == list(range(ROWS))
    assert all(image.size == IMAGE_SHAPE[1:] for image, _ in rows)
    assert all((meta["label"] is not None) == labelled(kind, model) for _, meta in rows)
