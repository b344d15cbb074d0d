"""Evaluation: likelihood bounds against known answers, Fréchet distance, TSTR, presets, and `vaegen evaluate`
end to end on real Fashion-MNIST and on a colour image folder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import root_args, unique_name
from PIL import Image

from cluster.data.datasets import ingest
from cluster.data.ingest import ingest_source
from cluster.show.evaluation import (
    classifier_key,
    evenly_spaced,
    quick_evaluation,
    reference_classifier,
    summary_table,
)
from cluster.store.storage import open_storage
from jobs.args import train_job_config
from jobs.cli import build_parser, main
from vae_core.classifier import CLASSIFIER_WEIGHTS, accuracy, train_classifier
from vae_core.config import ModelConfig, TrainConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError
from vae_core.evaluate import frechet_distance, iwae_bounds, log_normal, model_likelihood, sample_quality
from vae_core.models import build_model
from vae_core.presets import PRESETS
from vae_core.train import ImageSet, beta_at_epoch, evaluate, fit, iterate_batches, lr_at_epoch, split_train_val
from vae_core.use_configs import ClassifierConfig

# -- likelihood bounds ---------------------------------------------------------------------------------

def linear_gaussian(seed: int = 0, z_dim: int = 2, x_dim: int = 5, sigma: float = 0.5):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I), so p(x) = N(b, WWᵀ + σ²I) exactly. q(z|x) is the exact
    posterior's mean with its marginal variances inflated 3×: a diagonal, too-wide proposal."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(x_dim, z_dim, generator=g, dtype=torch.float64), torch.randn(x_dim, generator=g,
                                                                                  dtype=torch.float64)
    post_cov = torch.linalg.inv(torch.eye(z_dim, dtype=torch.float64) + w.T @ w / sigma**2)
    log_sigma2 = torch.tensor(2 * math.log(sigma), dtype=torch.float64)

    def encode(x):
        mu = (x - b) @ w @ post_cov / sigma**2                         # (B, Z): exact posterior mean
        return mu, torch.log(3.0 * post_cov.diagonal()).expand_as(mu)

    def log_px_given_z(z, x):
        return log_normal(x, z @ w.T + b, log_sigma2.expand_as(x))

    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(x_dim, dtype=torch.float64))
    return encode, log_px_given_z, marginal


def test_iwae_recovers_the_exact_likelihood_of_a_linear_gaussian_model():
    encode, log_px_given_z, marginal = linear_gaussian()
    torch.manual_seed(0)
    x = marginal.sample((256,))
    exact = marginal.log_prob(x)
    iwae, elbo = iwae_bounds(encode, log_px_given_z, x, k=5000, seed=1)
    assert (iwae - exact).abs().mean() < 0.02 and (iwae - exact).abs().max() < 0.1   # converged to log p(x)
    assert (exact - elbo).mean() > 0.5                                # the ELBO is a much looser bound
    gaps = [(exact - iwae_bounds(encode, log_px_given_z, x, k=k, seed=1)[0]).mean().item() for k in (1, 10, 100)]
    assert gaps[0] > gaps[1] > gaps[2] and abs(gaps[2]) < 0.05        # tightens as k grows


@pytest.fixture(scope="module")
def tiny_vae(small_fashion):
    """An MLP VAE trained for 2 epochs on 2,000 real binarised Fashion-MNIST images."""
    (train_x, train_y), _ = small_fashion
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=8))
    cfg = TrainConfig(epochs=2, binarize=True, patience=2)
    train, val = split_train_val(ImageSet(torch.from_numpy(train_x), torch.from_numpy(train_y)), 0.1, 0)
    fit(model, train, val, cfg)
    return model, cfg


def test_iwae_bound_is_above_the_elbo_and_tightens_with_k_on_real_data(tiny_vae, small_fashion):
    model, cfg = tiny_vae
    _, (test_x, _) = small_fashion
    images = torch.from_numpy(test_x[:100])
    results = {k: model_likelihood(model, images, None, k=k, seed=3) for k in (1, 10, 100)}
    assert results[1].nll > results[10].nll > results[100].nll        # NLL = −bound: smaller is tighter
    assert results[100].nll < results[100].neg_elbo                   # log p ≥ IWAE_k ≥ ELBO
    analytic = evaluate(model, iterate_batches(ImageSet(images), 100), cfg, seed=3)["loss"]   # −ELBO, analytic KL
    assert abs(results[100].neg_elbo - analytic) < 3.0                # the same quantity, two estimators
    assert results[100].nll < analytic
    assert "binarised" in results[100].data and results[100].images == 100
    again = model_likelihood(model, images, None, k=100, seed=3)
    assert again.nll == results[100].nll                              # seeded: identical figures


def test_iwae_refuses_k_below_one_and_unlabelled_conditional_models():
    encode, log_px_given_z, marginal = linear_gaussian()
    with pytest.raises(VaegenError, match="--k=0"):
        iwae_bounds(encode, log_px_given_z, marginal.sample((2,)), k=0)
    cond = build_model(ModelConfig(image_shape=(1, 28, 28), num_classes=10))
    with pytest.raises(VaegenError, match="labels"):
        model_likelihood(cond, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), None, k=2)


def test_a_reference_classifier_cut_to_fewer_images_sees_every_class_of_a_class_by_class_split():
    labels = np.repeat(np.arange(10), 100)             # as an image folder is ingested: class after class
    rows = evenly_spaced(len(labels), 50)
    assert len(set(rows.tolist())) == 50 and rows.max() < len(labels)
    assert np.bincount(labels[rows]).tolist() == [5] * 10


# -- Fréchet distance ------------------------------------------------------------------------------------

def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    noisy = [frechet_distance(a, a + rng.normal(scale=s, size=a.shape)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert noisy == sorted(noisy) and noisy[0] > 0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu_a, mu_b, sd_a, sd_b = np.zeros(4), np.array([1.0, 0, 0, 2]), np.ones(4), np.array([2.0, 1, 3, 1])
    a, b = rng.normal(mu_a, sd_a, size=(200_000, 4)), rng.normal(mu_b, sd_b, size=(200_000, 4))
    expected = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()   # = 5 + 5
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    with pytest.raises(VaegenError, match="same D"):
        frechet_distance(a, b[:, :3])


# -- classifier and TSTR ----------------------------------------------------------------------------------

@pytest.mark.slow         # trains classifiers and a VAE
def test_tstr_pipeline_runs_end_to_end_on_a_few_hundred_real_images(small_fashion):
    (train_x, train_y), (test_x, test_y) = small_fashion
    train = ImageSet(torch.from_numpy(train_x[:400]), torch.from_numpy(train_y[:400]))
    test_images, test_labels = torch.from_numpy(test_x[:300]), torch.from_numpy(test_y[:300])
    reference = train_classifier(train.images, train.labels, 10, ClassifierConfig(epochs=3, batch_size=32))
    assert accuracy(reference, test_images, test_labels) > 0.55        # far above the 10% of chance
    torch.manual_seed(0)
    # a 2-d latent and β=2 leave the class to the label input, so even a short fit makes class-specific samples
    cond = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=2, num_classes=10))
    fit(cond, *split_train_val(train, 0.1, 0), TrainConfig(epochs=8, batch_size=32, lr=3e-3, beta=2.0, patience=8))
    quality = sample_quality(cond, reference, test_images, test_labels, samples=300, seed=0,
                             classifier_cfg=ClassifierConfig(epochs=5, batch_size=32))
    assert quality.tstr_accuracy is not None and quality.tstr_accuracy > 0.2     # learnt from samples alone
    assert quality.classifier_fid > 0 and math.isfinite(quality.classifier_fid)
    unconditional = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=32, latent_dim=4))
    blank = sample_quality(unconditional, reference, test_images, test_labels, samples=300, seed=0)
    assert blank.tstr_accuracy is None and "unconditional" in blank.tstr_note
    assert blank.classifier_fid > quality.classifier_fid                # an untrained model looks worse


# -- training options and presets ----------------------------------------------------------------------

def test_lr_schedule_and_kl_warmup_follow_their_settings():
    flat = TrainConfig(epochs=5)
    assert [lr_at_epoch(e, flat) for e in range(5)] == [1e-3] * 5 and beta_at_epoch(0, flat) == 1.0
    cosine = TrainConfig(epochs=5, lr_schedule="cosine", kl_warmup_epochs=4, beta=2.0)
    lrs = [lr_at_epoch(e, cosine) for e in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5) and lrs == sorted(lrs, reverse=True)
    assert [beta_at_epoch(e, cosine) for e in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    with pytest.raises(VaegenError, match="--lr-schedule"):
        TrainConfig(lr_schedule="step")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_set_defaults_and_typed_flags_win(preset):
    parse = build_parser().parse_args
    job = train_job_config(parse(["train", "--preset", preset]))
    assert job.name == preset and job.conditional == PRESETS[preset].job().conditional
    assert job.train.epochs == PRESETS[preset].job().train.epochs and job.model.arch == PRESETS[preset].job().model.arch
    typed = train_job_config(parse(["train", "--preset", preset, "--epochs", "10", "--latent-dim", "20",
                                    "--name", "mine"]))
    assert (typed.train.epochs, typed.model.latent_dim, typed.name) == (10, 20, "mine")   # 10 = the default
    assert typed.train.batch_size == PRESETS[preset].job().train.batch_size


def test_the_classic_flags_without_a_preset_are_unchanged():
    job = train_job_config(build_parser().parse_args(["train"]))
    assert job.model == ModelConfig() and job.train == TrainConfig() and not job.conditional


# -- `vaegen evaluate` on storage --------------------------------------------------------------------------

@pytest.mark.slow         # trains, then evaluates, through the CLI
def test_vaegen_evaluate_writes_its_results_into_the_model_version(fashion_root, capsys):
    name = unique_name("ev")
    assert main(["train", "--dataset", "fm-small", "--name", name, "--conditional", "--hidden-dim", "64",
                 "--epochs", "1", "--no-progress", *root_args(fashion_root)]) == 0
    argv = ["evaluate", "--model", name, "--k", "20", "--limit", "50", "--samples", "200",
            "--classifier-epochs", "1", "--no-progress", *root_args(fashion_root)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NLL" in out and "TSTR" in out and "evaluation.json" in out
    storage = open_storage(fashion_root)
    version = f"models/{name}/v0001"
    report = json.loads(storage.read_bytes(f"{version}/evaluation.json"))
    assert report["split"] == "test" and report["likelihood"]["k"] == 20 and report["likelihood"]["images"] == 50
    assert report["likelihood_images"] == "first 50 of 500 test images"
    assert 100 < report["likelihood"]["nll"] <= report["likelihood"]["neg_elbo"]
    assert 0 <= report["quality"]["tstr_accuracy"] <= 1 and report["quality"]["real_accuracy"] > 0.3
    assert storage.read_bytes(f"{version}/evaluation.png")[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(storage.read_bytes(f"{version}/metrics.json"))
    assert metrics["evaluation"]["nll"] == report["likelihood"]["nll"] and metrics["history"]   # merged, not lost
    stored = storage.read_bytes(classifier_key("fm-small", CLASSIFIER_WEIGHTS))
    assert main(argv) == 0                                            # the classifier is reused, not retrained
    assert storage.read_bytes(classifier_key("fm-small", CLASSIFIER_WEIGHTS)) == stored
    again = json.loads(storage.read_bytes(f"{version}/evaluation.json"))
    assert (again["likelihood"]["nll"], again["quality"]) == (report["likelihood"]["nll"], report["quality"])  # seeded
    assert main(argv + ["--classifier-max-images", "300"]) == 0     # other settings: a classifier of their own
    cut = json.loads(storage.read_bytes(f"{version}/evaluation.json"))["quality"]["reference_classifier"]
    assert cut["train_images"] == 300 and cut["settings"]["max_images"] == 300
    assert storage.read_bytes(classifier_key("fm-small", CLASSIFIER_WEIGHTS)) != stored
    quick = quick_evaluation(name, fashion_root, k=5, limit=20)        # what `vaegen pipeline` prints at its end
    assert quick.report["likelihood"]["images"] == 20 and "quality" not in quick.report
    assert summary_table([quick]).strip().startswith(f"{name}@v0001  NLL ")


def colour_folder(path, per_class: int = 24):
    """A 3×32×32 image folder: reddish discs vs bluish squares with noise, two classes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for cls, mask in (("disc", (yy - 16) ** 2 + (xx - 16) ** 2 < 100), ("square", (abs(yy - 16) < 9) & (abs(xx - 16) < 9))):
        (path / cls).mkdir(parents=True)
        colour = np.array([220, 60, 40] if cls == "disc" else [40, 80, 220])
        for i in range(per_class):
            img = rng.integers(0, 40, size=(32, 32, 3)) + mask[..., None] * colour
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path / cls / f"{i:03d}.png")
    return path


@pytest.mark.slow         # trains classifiers and a VAE
def test_vaegen_evaluate_works_the_same_on_a_colour_image_folder(tmp_path, local_storage_config, capsys):
    ingest_source("image-folder", str(colour_folder(tmp_path / "shapes")), local_storage_config, progress=False)
    args = root_args(local_storage_config)
    assert main(["train", "--dataset", "shapes", "--name", "shapes-conv", "--arch", "conv", "--conditional",
                 "--hidden-dim", "32", "--latent-dim", "4", "--epochs", "1", "--no-progress", *args]) == 0
    assert main(["evaluate", "--model", "shapes-conv", "--k", "8", "--classifier-epochs", "2",
                 "--no-progress", *args]) == 0
    storage = open_storage(local_storage_config)
    report = json.loads(storage.read_bytes("models/shapes-conv/v0001/evaluation.json"))
    assert report["split"] == "train"                                 # an image folder has only that split
    assert report["likelihood"]["images"] == 48 and report["quality"]["tstr_accuracy"] is not None
    assert report["quality"]["samples"] == 48              # by default as many as the real images it learnt from
    picture = Image.open(storage.path("models/shapes-conv/v0001/evaluation.png"))
    assert picture.mode == "RGB" and picture.height > 200


def test_bad_input_gives_one_line_errors(fashion_root, capsys):
    args = root_args(fashion_root)
    cases = [(["evaluate", "--model", "nosuch"], "no model named 'nosuch'"),
             (["evaluate", "--model", "x", "--k", "0"], "--k=0 must be >= 1"),
             (["evaluate", "--model", "x", "--samples", "1"], "--samples=1: a Fréchet distance needs at least 2")]
    name = unique_name("bad")
    assert main(["train", "--dataset", "fm-small", "--name", name, "--hidden-dim", "16", "--epochs", "1",
                 "--max-images", "200", "--no-progress", *args]) == 0
    capsys.readouterr()
    cases.append((["evaluate", "--model", name, "--split", "dev", "--no-quality"], "has no split 'dev'"))
    for argv, message in cases:
        assert main([*argv, "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vaegen: error: ") and message in err and err.count("\n") == 1


def test_a_corrupt_stored_classifier_is_refused(local_storage_config, small_fashion):
    (train_x, train_y), _ = small_fashion
    storage = open_storage(local_storage_config, for_writing=True)
    ingest(storage, "fm-tiny", ArrayDataset({"train": ArraySplit(train_x[:200], train_y[:200])},
                                            tuple(str(i) for i in range(10)), "t"), progress=False)
    cfg = ClassifierConfig(epochs=1)
    reference_classifier(storage, "fm-tiny", cfg)
    storage.publish(classifier_key("fm-tiny", CLASSIFIER_WEIGHTS), b"not safetensors")
    with pytest.raises(VaegenError, match="sha256"):
        reference_classifier(storage, "fm-tiny", cfg)


def test_the_summary_says_why_an_unconditional_model_has_no_tstr():
    from cluster.show.evaluation import summary_line
    report = {"likelihood_model": "bernoulli", "likelihood": {"nll": 90.0, "k": 100, "images": 500, "neg_elbo": 95.0},
              "quality": {"real_accuracy": 0.9, "classifier_fid": 3.0, "tstr_accuracy": None}}
    assert summary_line(report).endswith("classifier-FID 3.00, no TSTR (unconditional model: its samples have no "
                                         "labels)")
    report["quality"]["tstr_accuracy"] = 0.8
    assert summary_line(report).endswith("classifier-FID 3.00, TSTR 80.0%")
