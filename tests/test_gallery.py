"""`vaegen show`: a static gallery.html that headless Chromium renders with every image loaded and the
manifest's counts on the page; a partial job is said to be partial and still shown; a model version too."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.datasets import ingest
from cluster.generate import run_generation, run_reconstruction
from cluster.layout import RECEIPTS, SUCCESS
from cluster.registry import Registry
from cluster.storage import open_storage
from conftest import start_local_ray
from jobs.cli import main as vaegen
from vae_core.checkpoint import checkpoint_files
from vae_core.config import GenerateConfig, ModelConfig, StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.images import curves_png
from vae_core.models import build_model

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} missing: apt-get install -y chromium (./dev.sh installs it)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]


def render(page: str, workdir) -> tuple[str, np.ndarray]:
    """Chromium's DOM after load (scripts run) and a screenshot, each from a fresh profile."""
    url = f"file://{page}"
    common = [CHROMIUM, *CHROMIUM_FLAGS]
    dom = subprocess.run([*common, f"--user-data-dir={workdir / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    shot = workdir / "screenshot.png"
    subprocess.run([*common, f"--user-data-dir={workdir / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1200,1600", url], capture_output=True, timeout=120, check=True)
    return dom, np.asarray(Image.open(shot).convert("L"))


def body_counts(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom).group(0)
    loaded = re.search(r'data-images-loaded="(\d+)"', body)
    total = re.search(r'data-images-total="(\d+)"', body)
    assert loaded and total, f"the page's load script did not run: {body}"
    return int(loaded.group(1)), int(total.group(1))


def shown_count(dom: str, field: str) -> int:
    return int(re.search(rf'id="{field}" data-count="(\d+)"', dom).group(1))


def publish_model_with_plots(storage, name: str, num_classes: int = 0) -> str:
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=32, latent_dim=4, num_classes=num_classes))
    files = checkpoint_files(model)
    files["metrics.json"] = json.dumps({"test_loss": 251.5, "best_epoch": 2, "epochs_run": 3}).encode()
    files["curves.png"] = curves_png({"train loss": [300.0, 270.0, 260.0], "val loss": [290.0, 268.0, 262.0]})
    return str(Registry(storage).publish(name, files))


@pytest.fixture(scope="module")
def root(s3_server, starts_ray, small_fashion, tmp_path_factory):
    """Reconstructions (Parquet) of 200 real test images, 90 conditional samples (PNG tars) and a partial job."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("gallery") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (images, labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(images[:200], labels[:200])}, tuple("ABCDEFGHIJ"), "t"),
           shard_rows=100, progress=False)
    publish_model_with_plots(storage, "tiny")
    publish_model_with_plots(storage, "tiny-cond", num_classes=10)
    recon = run_reconstruction(GenerateConfig(model="tiny", kind="reconstructions", dataset="fm"), cfg,
                               progress=False)
    samples = run_generation(GenerateConfig(model="tiny-cond", count=90, shard_size=30, format="png"), cfg,
                             progress=False)
    partial = run_generation(GenerateConfig(model="tiny", count=60, shard_size=20, seed=5), cfg, progress=False)
    storage.delete(f"{partial['prefix']}/{SUCCESS}")                 # one of three shards done, no commit
    for name in ("part-00000", "part-00002"):
        storage.delete(f"{partial['prefix']}/{name}.parquet")
        storage.delete(f"{partial['prefix']}/{RECEIPTS}/{name}.parquet.json")
    return cfg, recon, samples, partial


def gallery_path(cfg, manifest) -> str:
    return os.path.join(cfg.root, manifest["prefix"], "gallery.html")


@needs_chromium
def test_a_finished_job_renders_with_every_image_loaded_and_the_manifest_counts(root, tmp_path, capsys):
    cfg, recon, _, _ = root
    assert vaegen(["show", os.path.join(cfg.root, recon["prefix"])]) == 0
    assert "200 images in 2 of 2 shards" in capsys.readouterr().out
    page = gallery_path(cfg, recon)
    text = open(page).read()
    assert not re.search(r'(src|href)="(?!data:)', text)                 # no external assets
    dom, shot = render(page, tmp_path)

    loaded, total = body_counts(dom)
    assert loaded == total and total >= 2 * 24 + 2                      # pairs, curves, contact sheets
    assert shown_count(dom, "rows") == recon["totals"]["rows"] and shown_count(dom, "shards") == recon["totals"]["shards"]
    assert dom.count('alt="original ') == dom.count('alt="reconstruction ') == 24
    assert "reconstructions" in dom and "test_loss" in dom and 'alt="loss curves"' in dom
    assert "vaegen reconstruct --dataset fm" in dom
    assert shot.shape[0] > 500 and shot.std() > 10                       # a drawn page, not a blank one


@needs_chromium
def test_contact_sheets_per_class_and_png_shards(root, tmp_path):
    cfg, _, samples, _ = root
    assert vaegen(["show", samples["job_id"], "--root", cfg.root, "--per-class", "3"]) == 0
    dom, _ = render(gallery_path(cfg, samples), tmp_path)
    loaded, total = body_counts(dom)
    assert loaded == total
    assert shown_count(dom, "rows") == 90 and shown_count(dom, "shards") == 3
    headings = re.findall(r"<h3>(\d+): class_\d+</h3>", dom)
    assert sorted(map(int, headings)) == list(range(10))                # one sheet per class
    assert len(re.findall(r'alt="id \d+"', dom)) == 30                  # 3 per class


@needs_chromium
def test_a_partial_job_says_so_and_shows_what_is_there(root, tmp_path, capsys):
    cfg, _, _, partial = root
    assert vaegen(["show", os.path.join(cfg.root, partial["prefix"])]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL (no _SUCCESS)" in out and "20 images in 1 of 3 shards" in out
    dom, _ = render(gallery_path(cfg, partial), tmp_path)
    assert 'data-state="partial"' in dom and "PARTIAL" in dom
    assert shown_count(dom, "shards") == 1 and shown_count(dom, "rows") == 20
    loaded, total = body_counts(dom)
    assert loaded == total and len(re.findall(r'alt="id \d+"', dom)) == 16


@needs_chromium
def test_a_model_version_gallery_and_open_prints_the_path(root, tmp_path, capsys):
    cfg, _, _, _ = root
    assert vaegen(["show", os.path.join(cfg.root, "models", "tiny", "v0001"), "--open"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(cfg.root, "models", "tiny", "v0001", "gallery.html")
    dom, _ = render(path, tmp_path)
    loaded, total = body_counts(dom)
    assert loaded == total == 1 and "test_loss" in dom and "251.5" in dom


def test_show_of_an_unknown_job_or_model_is_one_clear_error(root, capsys):
    cfg, _, _, _ = root
    assert vaegen(["show", os.path.join(cfg.root, "outputs", "samples-0000")]) == 2
    assert "no job 'samples-0000'" in capsys.readouterr().err
    assert vaegen(["show", "nosuchmodel", "--root", cfg.root]) == 2
    assert "no model named 'nosuchmodel'" in capsys.readouterr().err



def test_a_job_on_s3_shows_to_a_local_file_and_beside_its_shards(ray_local, s3_storage_config, tmp_path, capsys):
    storage = open_storage(s3_storage_config, for_writing=True)
    publish_model_with_plots(storage, "tiny")
    job = run_generation(GenerateConfig(model="tiny", count=40, shard_size=20), s3_storage_config, progress=False)
    uri = storage.uri_of(job["prefix"])
    out = tmp_path / "gallery.html"
    flags = ["--s3-endpoint", s3_storage_config.s3_endpoint]
    assert vaegen(["show", uri, "--out", str(out), "--open", *flags]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert 'id="rows" data-count="40"' in text and len(re.findall(r'alt="id \d+"', text)) == 16
    assert vaegen(["show", uri, *flags]) == 0
    assert storage.read_bytes(f"{job['prefix']}/gallery.html").decode() == text
