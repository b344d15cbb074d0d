"""Named training recipes: `vaegen train --preset fmnist-best` reproduces a figure with one command.

A preset gives defaults only: any flag the user types wins. What each preset scores and how long it trains:
docs/BENCHMARKS.md; why each setting is what it is: docs/EXPERIMENTS.md."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import ModelConfig, TrainConfig, TrainJobConfig
from .errors import VaegenError


@dataclass(frozen=True)
class Preset:
    description: str
    model: dict[str, Any] = field(default_factory=dict)      # ModelConfig fields
    train: dict[str, Any] = field(default_factory=dict)      # TrainConfig fields
    conditional: bool = False


PRESETS: dict[str, Preset] = {
    # The reference design at the classic settings (pytorch/examples vae): grey-level BCE, no schedule.
    # It holds out only 2% for early stopping, so it trains on nearly all of the images, as the classic recipe does.
    "mlp-classic": Preset(
        "MLP 784-400-20, batch 128, Adam 1e-3, 10 epochs, grey-level Bernoulli (the classic VAE)",
        model={"arch": "mlp", "hidden_dim": 400, "latent_dim": 20},
        train={"epochs": 10, "batch_size": 128, "lr": 1e-3, "val_fraction": 0.02}),
    # Best likelihood: conv VAE on dynamically binarised pixels (the setting NLL papers report), KL warm-up
    # against inactive latents, cosine learning-rate decay; patience = epochs so the schedule runs out. The prior
    # is a Gaussian mixture fitted to the aggregate posterior after training (vae_core.prior). Both conv presets
    # keep PyTorch's own output initialisation and torch's for-loop Adam, so that they reproduce the weights
    # their published figures come from.
    "fmnist-best": Preset(
        "conv VAE (32,64)-512-32 on dynamically binarised pixels, cosine lr, KL warm-up 5 epochs, "
        "100-Gaussian prior fitted after training",
        model={"arch": "conv", "conv_channels": (32, 64), "hidden_dim": 512, "latent_dim": 32,
               "prior_components": 100},
        train={"epochs": 100, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine", "kl_warmup_epochs": 5,
               "binarize": True, "patience": 100, "val_fraction": 0.02, "output_init": "default",
               "adam": "for-loop"}),
    # Best samples for TSTR: a class-conditional conv VAE on grey levels. Decoder means are smooth and real images
    # are not, so a classifier trained on them learns the wrong domain: the likelihood is Gaussian with a fixed σ
    # and samples are the model's own x ~ p(x | z), pixel noise included. The prior is a mixture per class fitted
    # to the posterior, with the number of components chosen by held-out ELBO.
    "fmnist-cond": Preset(
        "class-conditional conv VAE (32,64)-512-32, Gaussian σ=0.2 on grey levels, cosine lr, "
        "10 Gaussians per class fitted as the prior after training",
        model={"arch": "conv", "conv_channels": (32, 64), "hidden_dim": 512, "latent_dim": 32,
               "likelihood": "gaussian", "sigma": 0.2, "prior_components": 10},
        train={"epochs": 36, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine", "patience": 36,
               "val_fraction": 0.02, "output_init": "default", "adam": "for-loop"},
        conditional=True),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise VaegenError(f"--preset={name!r} is unknown (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset_job(name: str, **job_fields: Any) -> TrainJobConfig:
    """The TrainJobConfig a preset describes (named after the preset), with job fields such as storage."""
    preset = get_preset(name)
    return TrainJobConfig(model=ModelConfig(**preset.model), train=TrainConfig(**preset.train),
                          conditional=preset.conditional, **{"name": name, **job_fields})


def with_preset(name: str, model: dict[str, Any], train: dict[str, Any], given: set[str]
                ) -> tuple[dict[str, Any], dict[str, Any], bool | None]:
    """Layer a preset under explicit settings: (model kwargs, train kwargs, conditional or None), where a
    key in `given` (the flags the user typed) keeps its value and every other key takes the preset's."""
    preset = get_preset(name)
    model = {**model, **{k: v for k, v in preset.model.items() if k not in given}}
    train = {**train, **{k: v for k, v in preset.train.items() if k not in given}}
    conditional = None if "conditional" in given else preset.conditional
    _check_fields(ModelConfig, model)
    _check_fields(TrainConfig, train)
    return model, train, conditional


def _check_fields(cls: type, values: dict[str, Any]) -> None:
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise VaegenError(f"preset sets unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
