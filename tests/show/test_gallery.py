"""`vaegen show`: a static gallery.html that headless Chromium renders with every image loaded and the
manifest's counts on the page; a partial job is said to be partial and still shown; a model version too, with
its settings, metrics in words, matplotlib loss curves, captioned grids, the per-epoch sample grids written while
it trained, and its evaluation. `show --open` opens the page only where there is a display."""
import base64
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import start_local_ray, vaegen_in_a_fresh_process
from PIL import Image

from cluster.data.datasets import ingest
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.show.evaluation import evaluate_model
from cluster.store.layout import GALLERY, SUCCESS, JobKeys
from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from cluster.train.driver import train_model
from jobs.cli import main as vaegen
from jobs.outputs_cmds import has_display
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.models import build_model
from vae_core.plots import loss_curves_png
from vae_core.use_configs import ClassifierConfig, EvalJobConfig, GenerateConfig

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} missing: apt-get install -y chromium (./dev.sh installs it)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]


def render(page: str, workdir, shot=None, height: int = 1600) -> tuple[str, np.ndarray]:
    """Chromium's DOM after load (scripts run) and a screenshot (to `shot`, if given), each from a fresh profile."""
    url = f"file://{page}"
    common = [CHROMIUM, *CHROMIUM_FLAGS]
    dom = subprocess.run([*common, f"--user-data-dir={workdir / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    shot = shot or workdir / "screenshot.png"
    subprocess.run([*common, f"--user-data-dir={workdir / 'profile-shot'}", f"--screenshot={shot}",
                    f"--window-size=1200,{height}", url], capture_output=True, timeout=120, check=True)
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
    files["metrics.json"] = json.dumps({"test_loss": 251.5, "best_epoch": 2, "epochs_run": 3,
                                        "seconds_to_first_batch": 0.25}).encode()
    files["curves.png"] = loss_curves_png([{"loss": 300.0, "val_loss": 290.0}, {"loss": 270.0, "val_loss": 268.0}])
    return str(Registry(storage).publish(name, files))


TRAINED = TrainJobConfig(dataset="fm", name="fm-cond", conditional=True, run_id="fm-cond-run",
                         model=ModelConfig(hidden_dim=32, latent_dim=4),
                         train=TrainConfig(epochs=3, batch_size=50, patience=5, threads=1))


@pytest.fixture(scope="module")
def root(s3_server, starts_ray, small_fashion, tmp_path_factory):
    """Reconstructions (Parquet) of 200 real test images, 90 conditional samples (PNG tars), a partial job, and
    a conditional model trained for 3 epochs on 300 real images, then evaluated (likelihood, FID, TSTR)."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("gallery") / "root"))
    storage = open_storage(cfg, for_writing=True)
    (train_x, train_y), (images, labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"train": ArraySplit(train_x[:300], train_y[:300]),
                                        "test": ArraySplit(images[:200], labels[:200])}, tuple("ABCDEFGHIJ"), "t"),
           shard_rows=100, progress=False)
    trained = train_model(replace(TRAINED, storage=cfg), progress=False)
    evaluate_model(EvalJobConfig(model=str(trained.ref), storage=cfg, k=5, limit=50, samples=200,
                                 classifier=ClassifierConfig(epochs=1)), progress=False)
    publish_model_with_plots(storage, "tiny")
    publish_model_with_plots(storage, "tiny-cond", num_classes=10)
    recon = run_reconstruction(GenerateConfig(model="tiny", kind="reconstructions", dataset="fm"), cfg,
                               progress=False)
    samples = run_generation(GenerateConfig(model="tiny-cond", count=90, shard_size=30, format="png"), cfg,
                             progress=False)
    partial = run_generation(GenerateConfig(model="tiny", count=60, shard_size=20, seed=5), cfg, progress=False)
    storage.delete(f"{partial['prefix']}/{SUCCESS}")                 # one of three shards done, no commit
    keys = JobKeys.of(partial["job_id"])
    for shard in (partial["shards"][0], partial["shards"][2]):
        storage.delete(keys.shard(shard["name"]))
        storage.delete(keys.receipt(shard["name"]))
    return cfg, recon, samples, partial, trained


def gallery_path(cfg, manifest) -> str:
    return os.path.join(cfg.root, JobKeys.of(manifest["job_id"]).gallery)


@needs_chromium
def test_a_finished_job_renders_with_every_image_loaded_and_the_manifest_counts(root, tmp_path, capsys):
    cfg, recon, _, _, _ = root
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
    assert "test loss (nats/image)" in dom and "first batch after (s)" in dom and 'alt="loss curves"' in dom
    assert "seconds_to_first_batch" not in dom and "test_loss" not in dom        # metrics in words, not keys
    assert "and its reconstruction (bottom)" in dom                             # the pairs say what they are
    assert re.search(r'id="job-spec".*<code>--model</code></td><td>tiny</td>', dom)          # the job's settings
    assert 'data-evaluated="no"' in dom and "vaegen evaluate --model tiny@v0001" in dom
    assert "vaegen reconstruct --dataset fm" in dom
    assert shot.shape[0] > 500 and shot.std() > 10                       # a drawn page, not a blank one


@needs_chromium
def test_contact_sheets_per_class_and_png_shards(root, tmp_path):
    cfg, _, samples, _, _ = root
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
    cfg, _, _, partial, _ = root
    assert vaegen(["show", os.path.join(cfg.root, partial["prefix"])]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL (no _SUCCESS)" in out and "20 images in 1 of 3 shards" in out
    dom, _ = render(gallery_path(cfg, partial), tmp_path)
    assert 'data-state="partial"' in dom and "PARTIAL" in dom
    assert shown_count(dom, "shards") == 1 and shown_count(dom, "rows") == 20
    loaded, total = body_counts(dom)
    assert loaded == total and len(re.findall(r'alt="id \d+"', dom)) == 20         # no labels: up to 64 shown
    assert "all images (no labels)" in dom


def inline_image(dom: str, alt: str) -> Image.Image:
    found = re.search(rf'<img [^>]*src="data:image/png;base64,([^"]+)" alt="{re.escape(alt)}"', dom)
    assert found, f"no inline image {alt!r}"
    return Image.open(io.BytesIO(base64.b64decode(found.group(1))))


@needs_chromium
def test_a_trained_and_evaluated_model_version_shows_everything_with_every_image_loaded(root, tmp_path,
                                                                                        monkeypatch, capsys):
    cfg, _, _, _, trained = root
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    version = os.path.join(cfg.root, "models", trained.ref.name, trained.ref.version)
    assert vaegen(["show", version, "--open"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(version, GALLERY)                       # no display: the path, and only it
    dom, shot = render(path, tmp_path)
    loaded, total = body_counts(dom)
    assert loaded == total and total >= 3 + 3 + 1                        # curves, samples, recon; 3 epochs; eval

    curves = inline_image(dom, "loss curves")                            # drawn by matplotlib, not by hand
    assert curves.format == "PNG" and curves.info.get("Software", "").startswith("Matplotlib")
    # The per-epoch grids the run wrote while training, published with the version, in epoch order.
    assert 'id="epoch-samples" data-count="3"' in dom
    assert re.findall(r'alt="samples after epoch (\d+)"', dom) == ["1", "2", "3"]
    first, last = inline_image(dom, "samples after epoch 1"), inline_image(dom, "samples after epoch 3")
    assert first.size == last.size == (8 * 30 + 2, 10 * 30 + 2)          # make_grid: 8 a row, a row per class
    assert np.asarray(first).tobytes() != np.asarray(last).tobytes()      # the same latents, other weights
    # Captions say what the rows are; metrics in words; the training settings by their flags.
    assert "one row per class" in dom and "odd rows" in dom and "validation images" in dom
    assert "first batch after (s)" in dom and "best validation loss (nats/image)" in dom
    assert "seconds_to_first_batch" not in dom and "best_val_loss" not in dom
    assert re.search(r'id="training-settings".*<code>--epochs</code></td><td>3</td>', dom)
    assert re.search(r'id="model-settings".*<code>--latent-dim</code></td><td>4</td>', dom)
    # The evaluation `vaegen evaluate` wrote: NLL/ELBO, classifier-FID, TSTR (conditional) and its picture.
    assert 'data-evaluated="yes"' in dom and "NLL (IWAE bound, k=5)" in dom and "−ELBO" in dom
    assert "classifier-FID (real vs generated)" in dom and "TSTR accuracy" in dom
    assert inline_image(dom, "evaluation").size[0] > 100
    assert shot.shape[0] > 500 and shot.std() > 10


def test_show_of_an_evaluated_model_version_imports_no_torch(root):
    """The model page reads metrics, grids and evaluation.json; drawing its loss curves needs matplotlib alone."""
    cfg, _, _, _, trained = root
    status, imported, stderr = vaegen_in_a_fresh_process(["show", str(trained.ref), "--root", cfg.root])
    assert (status, imported) == (0, []), stderr[-2000:]
    assert 'data-evaluated="yes"' in open(os.path.join(cfg.root, "models", trained.ref.name, trained.ref.version,
                                                       GALLERY)).read()


def test_each_epoch_writes_its_sample_grid_beside_the_run_and_into_the_version(root):
    cfg, _, _, _, trained = root
    storage = open_storage(cfg)
    run = storage.list(f"train-runs/{TRAINED.run_id}/samples")
    version = storage.list(f"models/{trained.ref.name}/{trained.ref.version}/samples")
    names = [e.key.rsplit("/", 1)[1] for e in run]
    assert sorted(names) == ["sample_1.png", "sample_2.png", "sample_3.png"]
    assert [e.key.rsplit("/", 1)[1] for e in version] == names
    for r, v in zip(run, version):
        assert storage.read_bytes(r.key) == storage.read_bytes(v.key)


@pytest.mark.slow            # a Ray Train run
def test_ray_rank_zero_writes_the_same_epoch_grids_as_one_process(root):
    """One Ray worker trains bit-identical weights to one process: its rank 0 decodes the same fixed latents
    after each epoch, so its grids are the same bytes."""
    cfg, _, _, _, trained = root
    storage = open_storage(cfg)
    on_ray = train_model(replace(TRAINED, storage=cfg, run_id="fm-cond-ray", ray=RayTrainConfig(workers=1)),
                         progress=False)
    for n in (1, 2, 3):
        grid = storage.read_bytes(f"models/{on_ray.ref.name}/{on_ray.ref.version}/samples/sample_{n}.png")
        assert grid == storage.read_bytes(f"train-runs/{TRAINED.run_id}/samples/sample_{n}.png")
        assert grid == storage.read_bytes(f"train-runs/fm-cond-ray/samples/sample_{n}.png")


def browser_recorder(tmp_path) -> tuple[str, object]:
    """A $BROWSER that records the URL it is given (webbrowser runs it with the URL as its argument)."""
    record = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$1" > "{record}"\n')
    script.chmod(0o755)
    return str(script), record


def run_vaegen(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """The CLI in a process of its own: webbrowser reads $BROWSER once per process."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("display", ["DISPLAY", "WAYLAND_DISPLAY", None])
def test_open_opens_the_browser_only_where_there_is_a_display(root, tmp_path, display):
    cfg, _, _, _, _ = root
    browser, record = browser_recorder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["BROWSER"] = browser
    if display:
        env[display] = ":0" if display == "DISPLAY" else "wayland-0"
    done = run_vaegen(["show", "tiny@v0001", "--root", cfg.root, "--open"], env)
    assert done.returncode == 0, done.stderr
    path = os.path.join(cfg.root, "models", "tiny", "v0001", GALLERY)
    assert done.stdout.strip() == path                                     # printed either way, for scripts
    if display:
        assert record.read_text() == f"file://{path}"                      # the page, in the user's browser
    else:
        assert not record.exists()                                         # no display: nothing started


def test_macos_and_windows_always_have_a_display_linux_only_with_one():
    assert has_display({}, "darwin") and has_display({}, "win32")
    assert not has_display({}, "linux") and not has_display({"DISPLAY": ""}, "linux")
    assert has_display({"DISPLAY": ":1"}, "linux") and has_display({"WAYLAND_DISPLAY": "wayland-0"}, "linux")


def test_show_of_an_unknown_job_or_model_is_one_clear_error(root, capsys):
    cfg, _, _, _, _ = root
    assert vaegen(["show", os.path.join(cfg.root, "outputs", "samples-0000")]) == 2
    assert "no job 'samples-0000'" in capsys.readouterr().err
    assert vaegen(["show", "nosuchmodel", "--root", cfg.root]) == 2
    assert "no model named 'nosuchmodel'" in capsys.readouterr().err



def test_a_job_on_s3_shows_to_a_local_file_and_beside_its_shards(ray_local, s3_storage_config, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    storage = open_storage(s3_storage_config, for_writing=True)
    publish_model_with_plots(storage, "tiny")
    job = run_generation(GenerateConfig(model="tiny", count=40, shard_size=20), s3_storage_config, progress=False)
    uri = storage.uri_of(job["prefix"])
    out = tmp_path / "gallery.html"
    flags = ["--s3-endpoint", s3_storage_config.s3_endpoint]
    assert vaegen(["show", uri, "--out", str(out), "--open", *flags]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert 'id="rows" data-count="40"' in text and len(re.findall(r'alt="id \d+"', text)) == 40
    assert vaegen(["show", uri, *flags]) == 0
    assert storage.read_bytes(JobKeys.of(job["job_id"]).gallery).decode() == text
