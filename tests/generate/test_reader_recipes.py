"""Every reader recipe vaegen gives runs as written: the README's (by the first line of each code block, which
names the jobs it is for) and each job card's "Load it" block, against jobs in every format (parquet, png, jpeg)
from a conditional and an unconditional model, and reconstructions of a test split."""
import os
import re
from pathlib import Path

import pytest
from conftest import start_local_ray
from generate_support import publish_tiny_model

from cluster.data.datasets import ingest
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.store.layout import CARD
from cluster.store.storage import open_storage
from vae_core.config import StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.use_configs import FORMATS, GenerateConfig

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")     # nothing may reach the network

README = Path(__file__).resolve().parents[2] / "README.md"
# What the first line of a README recipe says it is for -> the formats it must run on.
README_AUDIENCE = {"# any job": set(FORMATS), "# parquet jobs": {"parquet"}, "# png and jpeg jobs": {"png", "jpeg"}}
ROWS = 12


@pytest.fixture(scope="module")
def jobs(starts_ray, small_fashion, tmp_path_factory) -> list[tuple[str, dict]]:
    """(job folder, manifest) for samples of an unconditional and a conditional model and reconstructions of a
    `test` split, each in every format: small jobs of two shards each."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("recipes") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (test_images, test_labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:ROWS], test_labels[:ROWS])},
                                       tuple(f"class {i}" for i in range(10)), "test"), shard_rows=ROWS // 2,
           progress=False)
    publish_tiny_model(storage, "plain")
    publish_tiny_model(storage, "cond", num_classes=10)
    made = []
    for fmt in FORMATS:
        for model in ("plain", "cond"):
            made.append(run_generation(GenerateConfig(model=model, count=ROWS, shard_size=ROWS // 2, format=fmt),
                                       cfg, workers=1, progress=False))
        made.append(run_reconstruction(GenerateConfig(model="plain", kind="reconstructions", dataset="fm",
                                                      split="test", format=fmt), cfg, workers=1, progress=False))
    return [(os.path.join(cfg.root, m["prefix"]), m) for m in made]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def run_recipe(code: str, folder: str, placeholder: str) -> dict:
    """Run `code` as a user would paste it, with the job's folder in place of the placeholder; its variables."""
    assert placeholder in code
    names: dict = {}
    exec(compile(code.replace(placeholder, folder), f"<recipe for {folder}>", "exec"), names)  # noqa: S102
    return names


def check_what_it_read(names: dict, manifest: dict) -> None:
    """Whatever the recipe made reads the job's every row (and its labels where it has them)."""
    rows, labelled = manifest["totals"]["rows"], bool(manifest["labels"]) or manifest["kind"] == "reconstructions"
    if "ds" in names:
        ds = names["ds"]
        splits = ds if isinstance(ds, dict) else {manifest["split"]: ds}
        assert list(splits) == [manifest["split"]] and splits[manifest["split"]].num_rows == rows
    if "df" in names:
        assert sorted(names["df"]["id"]) == list(range(rows)) and ("label" in names["df"]) == labelled
        assert names["img"].size == (28, 28)
    if "rd" in names:
        assert names["rd"].count() == rows
    if "wd" in names:
        read = list(names["wd"])
        assert len(read) == rows
        if isinstance(read[0][1], dict):                      # (image, json): the label is there or None
            assert [m["label"] is not None for _, m in read] == [labelled] * rows


def test_every_job_card_recipe_runs_as_written(jobs):
    for folder, manifest in jobs:
        card = Path(folder, CARD).read_text()
        [recipe] = python_blocks(card.split("## Load it", 1)[1])
        check_what_it_read(run_recipe(recipe, folder, "<this folder>"), manifest)


def test_every_readme_recipe_runs_on_the_jobs_it_names(jobs):
    recipes = python_blocks(README.read_text().split("## Reading a job", 1)[1].split("\n## ", 1)[0])
    audiences = [recipe.split("\n", 1)[0].split(":", 1)[0] for recipe in recipes]
    assert audiences and set(audiences) <= set(README_AUDIENCE), audiences    # each names the jobs it is for
    assert set().union(*(README_AUDIENCE[a] for a in audiences)) == set(FORMATS)
    for recipe, audience in zip(recipes, audiences):
        for folder, manifest in jobs:
            if manifest["format"] in README_AUDIENCE[audience]:
                check_what_it_read(run_recipe(recipe, folder, "<job folder>"), manifest)
