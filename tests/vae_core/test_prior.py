"""The fitted prior: a Gaussian mixture (per class when conditional) fitted to the aggregate posterior after
training. Checked against torch.distributions, on a mixture it must recover, and end to end: it raises the
ELBO, survives a checkpoint, and `vaegen train --prior-components` / `vaegen evaluate` use it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import root_args, unique_name

from cluster.store.storage import open_storage
from jobs.cli import main
from vae_core.checkpoint import checkpoint_files, load_checkpoint
from vae_core.config import ModelConfig, TrainConfig
from vae_core.evaluate import model_likelihood
from vae_core.models import build_model
from vae_core.posterior import fit_prior
from vae_core.prior import MixturePrior, fit_mixture
from vae_core.train import ImageSet, fit, split_train_val

TINY = ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=4)


def random_mixture(groups: int, components: int, dim: int, seed: int = 0) -> MixturePrior:
    g = torch.Generator().manual_seed(seed)
    prior = MixturePrior(groups, components, dim)
    a = torch.randn(groups, components, dim, dim, generator=g) * 0.3
    prior.load(torch.randn(groups, components, generator=g), torch.randn(groups, components, dim, generator=g) * 3,
               torch.linalg.cholesky(a @ a.transpose(-1, -2) + 0.2 * torch.eye(dim)))
    return prior


def test_log_prob_matches_torch_distributions_per_class():
    prior = random_mixture(groups=3, components=4, dim=5)
    z, labels = torch.randn(7, 6, 5) * 3, torch.tensor([0, 2, 1, 2, 0, 1])              # (S, B, Z), (B,)
    expected = torch.stack([torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=prior.logits[c]),
        torch.distributions.MultivariateNormal(prior.loc[c], scale_tril=prior.scale_tril[c])).log_prob(z[:, b])
        for b, c in enumerate(labels.tolist())], dim=1)
    torch.testing.assert_close(prior.log_prob(z, labels), expected, rtol=1e-4, atol=1e-4)


def test_an_unfitted_mixture_is_the_standard_normal():
    z = torch.randn(10, 3)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(MixturePrior(1, 5, 3).log_prob(z, None), standard)


@pytest.mark.slow         # EM fits: seconds of CPU each
def test_em_recovers_a_known_mixture_and_sampling_follows_it():
    truth = random_mixture(groups=1, components=3, dim=2, seed=3)
    z = truth.sample(30_000, None, torch.Generator().manual_seed(0))
    logits, loc, scale_tril = fit_mixture(z, None, 3, torch.Generator().manual_seed(1))
    fitted = MixturePrior(1, 3, 2)
    fitted.load(logits[None], loc[None], scale_tril[None])
    held_out = truth.sample(5_000, None, torch.Generator().manual_seed(2))
    # the fit explains fresh data as well as the truth does (to 0.02 nats a point)
    assert fitted.log_prob(held_out, None).mean() > truth.log_prob(held_out, None).mean() - 0.02
    order = loc[:, 0].argsort()
    torch.testing.assert_close(loc[order], truth.loc[0][truth.loc[0][:, 0].argsort()], atol=0.1, rtol=0)


def test_em_on_posterior_gaussians_widens_each_component_by_their_variance():
    truth = random_mixture(groups=1, components=3, dim=2, seed=3)
    mu = truth.sample(3_000, None, torch.Generator().manual_seed(0))
    _, loc, scale_tril = fit_mixture(mu, torch.full_like(mu, 0.1), 3, torch.Generator().manual_seed(1))
    widened = truth.scale_tril[0] @ truth.scale_tril[0].mT + 0.1 * torch.eye(2)
    torch.testing.assert_close((scale_tril @ scale_tril.mT)[loc[:, 0].argsort()],
                               widened[truth.loc[0, :, 0].argsort()], atol=0.05, rtol=0)


@pytest.mark.slow         # EM fits: seconds of CPU each
def test_em_on_posterior_gaussians_generalises_better_than_em_on_one_draw_of_each():
    """Many components on few posteriors (as 100 components on fmnist-best's): a fit to one sample per
    posterior learns those samples; the fit to the Gaussians explains fresh draws from them better."""
    mu = random_mixture(groups=1, components=3, dim=2, seed=3).sample(300, None, torch.Generator().manual_seed(0))
    var = torch.full_like(mu, 0.1)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        to_gaussians, to_draws = MixturePrior(1, 20, 2), MixturePrior(1, 20, 2)
        to_gaussians.load(*(p[None] for p in fit_mixture(mu, var, 20, g)))
        one_draw = mu + var.sqrt() * torch.randn(mu.shape, generator=g)
        to_draws.load(*(p[None] for p in fit_mixture(one_draw, None, 20, g)))
        fresh = torch.cat([mu + var.sqrt() * torch.randn(mu.shape, generator=g) for _ in range(20)])
        assert to_gaussians.log_prob(fresh, None).mean() > to_draws.log_prob(fresh, None).mean() + 0.02


def test_a_class_prior_samples_each_class_from_its_own_gaussian():
    prior = random_mixture(groups=2, components=1, dim=3)
    labels = torch.tensor([0, 1]).repeat(5_000)
    z = prior.sample(len(labels), labels, torch.Generator().manual_seed(0))
    for c in (0, 1):
        torch.testing.assert_close(z[labels == c].mean(0), prior.loc[c, 0], atol=0.05, rtol=0)
        cov = prior.scale_tril[c, 0] @ prior.scale_tril[c, 0].T
        torch.testing.assert_close(torch.cov(z[labels == c].T), cov, atol=0.05, rtol=0)


def test_a_standard_prior_samples_exactly_what_torch_randn_draws():
    """Models without a fitted prior keep the generation stream they always had (shard bytes unchanged)."""
    model = build_model(TINY)
    z = model.sample_prior(8, None, torch.Generator().manual_seed(5))
    assert torch.equal(z, torch.randn(8, 4, generator=torch.Generator().manual_seed(5)))


def test_gaussian_samples_carry_the_pixel_noise_and_bernoulli_samples_are_the_mean():
    z = torch.zeros(2000, 4)
    gaussian = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=4,
                                       likelihood="gaussian", sigma=0.05))
    noise = gaussian.sample_images(z, None, torch.Generator().manual_seed(0)) - gaussian.generate(z)
    assert noise.std().item() == pytest.approx(0.05, rel=0.05)       # the mean of an untrained net is ~0.5
    bernoulli = build_model(TINY)
    assert torch.equal(bernoulli.sample_images(z), bernoulli.generate(z))


@pytest.fixture(scope="module")
def trained_with_prior(small_fashion):
    (images, labels), _ = small_fashion
    train, val = split_train_val(ImageSet(torch.from_numpy(images), torch.from_numpy(labels)), 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=64, latent_dim=4, prior_components=3))
    cfg = TrainConfig(epochs=2, batch_size=64, binarize=True)
    fit(model, train, val, cfg)
    return model, train, val, cfg


@pytest.mark.slow         # EM fits: seconds of CPU each
def test_fitting_the_prior_raises_the_elbo_and_the_likelihood(trained_with_prior):
    model, train, val, cfg = trained_with_prior
    test = ImageSet(val.images[:100])
    before = model_likelihood(model, test.images, None, k=50)
    gains = fit_prior(model, train, cfg, held_out=val)
    after = model_likelihood(model, test.images, None, k=50)
    assert gains["prior_elbo_gain_train"] > 0.05 and gains["prior_elbo_gain_val"] > 0.05, gains
    # same posterior samples, only log p(z) moved: −ELBO falls by about the held-out gain
    assert after.neg_elbo == pytest.approx(before.neg_elbo - gains["prior_elbo_gain_val"], abs=0.5)
    assert after.nll < before.nll
    files = checkpoint_files(model)
    loaded, _ = load_checkpoint(files, expected=model.cfg)
    assert torch.equal(loaded.prior.loc, model.prior.loc) and not torch.equal(model.prior.loc,
                                                                              torch.zeros_like(model.prior.loc))


@pytest.mark.slow         # trains, then evaluates, through the CLI
def test_vaegen_train_fits_a_class_prior_and_evaluate_uses_it(fashion_root):
    name = unique_name("prior")
    assert main(["train", "--dataset", "fm-small", "--name", name, "--conditional", "--hidden-dim", "64",
                 "--latent-dim", "4", "--prior-components", "1", "--likelihood", "gaussian", "--sigma", "0.2",
                 "--epochs", "1", "--no-progress", *root_args(fashion_root)]) == 0
    storage = open_storage(fashion_root)
    metrics = json.loads(storage.read_bytes(f"models/{name}/v0001/metrics.json"))
    assert metrics["prior_elbo_gain_train"] > 0 and "prior_elbo_gain_val" in metrics
    assert main(["evaluate", "--model", name, "--k", "10", "--limit", "20", "--samples", "200",
                 "--classifier-epochs", "1", "--no-progress", *root_args(fashion_root)]) == 0
    report = json.loads(storage.read_bytes(f"models/{name}/v0001/evaluation.json"))
    assert report["likelihood"]["nll"] <= report["likelihood"]["neg_elbo"]
    assert 0 <= report["quality"]["tstr_accuracy"] <= 1
