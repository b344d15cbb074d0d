"""The VAE's maths: shapes, losses against hand-computed values, gradients through the reparameterisation."""
import math
import subprocess
import sys

import pytest
import torch

from vae_core.config import ModelConfig, TrainConfig
from vae_core.errors import VaegenError
from vae_core.losses import bernoulli_nll, elbo_loss, gaussian_nll, kl_divergence
from vae_core.models import MLPVAE, ConvVAE, build_model
from vae_core.train import ImageSet, fit, mean_image, split_train_val, start_output

SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_forward_shapes(arch, shape, num_classes):
    cfg = ModelConfig(arch=arch, image_shape=shape, latent_dim=8, hidden_dim=32, num_classes=num_classes)
    model = build_model(cfg)
    x = torch.rand(5, *shape)
    labels = torch.arange(5) % 10 if num_classes else None
    logits, mu, logvar = model(x, labels)
    assert logits.shape == (5, *shape) and mu.shape == logvar.shape == (5, 8)
    images = model.generate(torch.randn(5, 8), labels)
    assert images.shape == (5, *shape) and images.min() >= 0 and images.max() <= 1


def test_reference_design_is_784_400_20():
    model = build_model(ModelConfig(image_shape=(1, 28, 28)))
    assert isinstance(model, MLPVAE)
    assert (model.enc.in_features, model.enc.out_features) == (784, 400)
    assert model.to_moments.out_features == 2 * 20
    assert (model.dec_hidden.in_features, model.dec_out.out_features) == (20, 784)


def test_conditional_model_needs_labels():
    model = build_model(ModelConfig(image_shape=(1, 28, 28), num_classes=10))
    with pytest.raises(ValueError, match="pass labels"):
        model(torch.rand(2, 1, 28, 28))


def test_labels_change_the_decoder_output():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="conv", image_shape=(1, 28, 28), num_classes=10))
    z = torch.randn(1, 20)
    assert not torch.allclose(model.generate(z, torch.tensor([0])), model.generate(z, torch.tensor([7])))


def test_kl_of_known_gaussians():
    # KL(N(0,1) || N(0,1)) = 0; KL(N(1, e^1) || N(0,1)) = 0.5 (e + 1 - 1 - 1) per dim
    assert kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0
    expected = 0.5 * (math.e + 1.0 - 1.0 - 1.0) * 4
    assert kl_divergence(torch.ones(1, 4), torch.ones(1, 4)).item() == pytest.approx(expected, rel=1e-6)


def test_bce_of_known_pixels():
    # pixels 1 and 0 with p = 0.8 and 0.3: −log 0.8 − log 0.7
    logits = torch.logit(torch.tensor([[0.8, 0.3]]))
    x = torch.tensor([[1.0, 0.0]])
    assert bernoulli_nll(logits, x).item() == pytest.approx(-math.log(0.8) - math.log(0.7), rel=1e-5)


def test_gaussian_nll_of_known_values():
    # one pixel, x − mean = 0.5, σ = 2: 0.5·(0.25)² ·... = 0.5·(0.5/2)² + log 2 + 0.5·log 2π
    value = gaussian_nll(torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.tensor(math.log(2.0))).item()
    assert value == pytest.approx(0.5 * 0.25 ** 2 + math.log(2.0) + 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_elbo_weights_kl_by_beta():
    logits, x = torch.zeros(2, 4), torch.full((2, 4), 0.5)
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
    one = elbo_loss(logits, x, mu, logvar, likelihood="bernoulli", log_sigma=torch.tensor(0.0), beta=1.0)
    four = elbo_loss(logits, x, mu, logvar, likelihood="bernoulli", log_sigma=torch.tensor(0.0), beta=4.0)
    assert four.loss.item() == pytest.approx(one.recon.item() + 4 * one.kl.item(), rel=1e-6)


def test_reparameterisation_lets_gradients_reach_the_encoder():
    model = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=16, latent_dim=4))
    x = torch.rand(3, 1, 28, 28)
    logits, mu, logvar = model(x)
    elbo_loss(logits, x, mu, logvar, likelihood="bernoulli", log_sigma=model.log_sigma).loss.backward()
    assert model.enc.weight.grad is not None and model.enc.weight.grad.abs().sum() > 0
    assert model.to_moments.weight.grad.abs().sum() > 0


def test_learned_sigma_is_a_parameter_fixed_sigma_is_not():
    learned = build_model(ModelConfig(image_shape=(1, 8, 8), likelihood="gaussian"))
    fixed = build_model(ModelConfig(image_shape=(1, 8, 8), likelihood="gaussian", sigma=0.1))
    assert any(n == "log_sigma" for n, _ in learned.named_parameters())
    assert not any(n == "log_sigma" for n, _ in fixed.named_parameters())
    assert fixed.log_sigma.item() == pytest.approx(math.log(0.1))


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "rnn"}, "--arch='rnn'"),
    ({"latent_dim": 0}, "--latent-dim=0"),
    ({"likelihood": "poisson"}, "--likelihood='poisson'"),
    ({"arch": "conv", "image_shape": (1, 30, 30)}, "divisible by 4"),
])
def test_invalid_model_config_names_the_flag(kwargs, message):
    with pytest.raises(VaegenError, match=message):
        ModelConfig(**kwargs)


def test_conv_vae_on_colour_images():
    model = build_model(ModelConfig(arch="conv", image_shape=(3, 32, 32)))
    assert isinstance(model, ConvVAE) and model.feature_shape == (64, 8, 8)


def test_vae_core_never_imports_ray_pyarrow_or_boto3():
    code = ("import sys, vae_core, vae_core.config, vae_core.models, vae_core.losses, vae_core.train, "
            "vae_core.checkpoint, vae_core.data, vae_core.images, vae_core.artifacts; "
            "print(sorted(m for m in ('ray', 'pyarrow', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_starting_at_the_mean_image_sets_the_output_bias_to_its_log_odds():
    grey = torch.rand(1, 28, 28) * 0.9 + 0.05
    mlp = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=32, latent_dim=4))
    mlp.start_at_mean_image(grey)                # one bias per pixel
    torch.testing.assert_close(torch.sigmoid(mlp.dec_out.bias), grey.flatten())
    colour = torch.rand(3, 32, 32) * 0.9 + 0.05
    conv = build_model(ModelConfig(arch="conv", image_shape=(3, 32, 32), hidden_dim=32, latent_dim=4))
    conv.start_at_mean_image(colour)             # one bias per channel: the channel's mean level
    torch.testing.assert_close(torch.sigmoid(conv.deconvs[-1].bias), colour.mean((1, 2)))


@pytest.mark.slow         # a training epoch
def test_starting_at_the_mean_image_trains_to_a_lower_loss(small_fashion):
    """The classic MLP, one epoch on 1,600 real images: the mean-image start is far ahead of PyTorch's default
    (352 against 399 nats when written)."""
    (images, labels), _ = small_fashion
    train, val = split_train_val(ImageSet(torch.from_numpy(images)), 0.2, seed=0)
    val_loss = {}
    for output_init in ("default", "mean"):
        cfg = TrainConfig(epochs=1, output_init=output_init)
        torch.manual_seed(0)
        model = build_model(ModelConfig(image_shape=(1, 28, 28)))
        start_output(model, mean_image(train), cfg)
        val_loss[output_init] = fit(model, train, val, cfg).best_val_loss
    assert val_loss["mean"] < val_loss["default"] - 20, val_loss


@pytest.mark.parametrize("shape,nrow", [((64, 1, 28, 28), 8), ((80, 1, 28, 28), 8), ((5, 3, 32, 32), 8),
                                        ((13, 3, 8, 8), 4)])
def test_grids_are_torchvisions_bytes_without_importing_it(shape, nrow):
    """The model version's grids are torchvision's save_image(make_grid(...)) with make_grid's own defaults for
    everything but pad_value, the one difference grid_png states."""
    import inspect
    import io

    from torchvision.utils import make_grid, save_image

    from vae_core.artifacts import NROW, PAD_VALUE, grid_png
    defaults = {k: p.default for k, p in inspect.signature(make_grid).parameters.items()}
    assert (defaults["nrow"], defaults["padding"]) == (NROW, 2) and defaults["pad_value"] != PAD_VALUE
    images = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    theirs = io.BytesIO()
    save_image(images, theirs, format="png", nrow=nrow, pad_value=PAD_VALUE)
    assert grid_png(images, nrow) == theirs.getvalue()
    black = io.BytesIO()
    save_image(images, black, format="png", nrow=nrow)             # make_grid's black borders: not the same bytes
    assert grid_png(images, nrow) != black.getvalue()
