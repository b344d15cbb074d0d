"""Named training recipes: `vaegen train --preset fmnist-best` trains the model a documented figure comes from.

Each recipe is a function that returns the TrainJobConfig it describes (named after the preset). On the command
line a preset fills only what neither a flag nor a --config key sets (layer_preset). What each preset scores:
docs/BENCHMARKS.md; why each setting is what it is: docs/EXPERIMENTS.md."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .config import ModelConfig, TrainConfig, TrainJobConfig
from .errors import VaegenError
from .names import MAX_NAME


def mlp_classic() -> TrainJobConfig:
    """The reference design at the classic settings (pytorch/examples vae): grey-level BCE, no schedule. It holds
    out only 2% for early stopping, so it trains on nearly all of the images, as the classic recipe does."""
    return TrainJobConfig(
        name="mlp-classic",
        model=ModelConfig(arch="mlp", hidden_dim=400, latent_dim=20),
        train=TrainConfig(epochs=10, batch_size=128, lr=1e-3, val_fraction=0.02))


# Both conv presets keep PyTorch's own output initialisation and torch's for-loop Adam, so that they reproduce
# the weights their documented figures come from.
def fmnist_best() -> TrainJobConfig:
    """Best likelihood: a conv VAE on dynamically binarised pixels (the setting NLL papers report), KL warm-up
    against inactive latents, cosine learning-rate decay; patience = epochs so the schedule runs out. The prior
    is a Gaussian mixture fitted to the aggregate posterior after training (vae_core.prior)."""
    return TrainJobConfig(
        name="fmnist-best",
        model=ModelConfig(arch="conv", conv_channels=(32, 64), hidden_dim=512, latent_dim=32, prior_components=100),
        train=TrainConfig(epochs=100, batch_size=128, lr=1e-3, lr_schedule="cosine", kl_warmup_epochs=5,
                          binarize=True, patience=100, val_fraction=0.02, output_init="default", adam="for-loop"))


def fmnist_cond() -> TrainJobConfig:
    """Best samples for TSTR: a class-conditional conv VAE on grey levels. Decoder means are smooth and real images
    are not, so a classifier trained on them learns the wrong domain: the likelihood is Gaussian with a fixed σ
    and samples are the model's own x ~ p(x | z), pixel noise included. The prior is a mixture per class fitted
    to the posterior, with the number of components chosen by held-out ELBO."""
    return TrainJobConfig(
        name="fmnist-cond", conditional=True,
        model=ModelConfig(arch="conv", conv_channels=(32, 64), hidden_dim=512, latent_dim=32,
                          likelihood="gaussian", sigma=0.2, prior_components=10),
        train=TrainConfig(epochs=36, batch_size=128, lr=1e-3, lr_schedule="cosine", patience=36,
                          val_fraction=0.02, output_init="default", adam="for-loop"))


def rgb64() -> TrainJobConfig:
    """64×64 RGB images (your own, through `vaegen ingest`): four stride-2 conv layers down to 4×4, a wider
    bottleneck for three channels of detail, grey levels as Bernoulli means (pixels in [0, 1]), cosine lr decay.
    Unconditional unless --conditional (a dataset without labels has nothing to condition on)."""
    return TrainJobConfig(
        name="rgb64",
        model=ModelConfig(arch="conv", conv_channels=(32, 64, 128, 256), hidden_dim=512, latent_dim=64),
        train=TrainConfig(epochs=30, batch_size=128, lr=1e-3, lr_schedule="cosine", patience=30,
                          val_fraction=0.05))


@dataclass(frozen=True)
class Preset:
    description: str                          # one line for `--help`
    recipe: Callable[[], TrainJobConfig]

    def job(self) -> TrainJobConfig:
        return self.recipe()


PRESETS: dict[str, Preset] = {
    "mlp-classic": Preset("MLP 784-400-20, batch 128, Adam 1e-3, 10 epochs, grey-level Bernoulli (the classic VAE)",
                          mlp_classic),
    "fmnist-best": Preset("conv VAE (32,64)-512-32 on dynamically binarised pixels, cosine lr, KL warm-up 5 epochs, "
                          "100-Gaussian prior fitted after training", fmnist_best),
    "fmnist-cond": Preset("class-conditional conv VAE (32,64)-512-32, Gaussian σ=0.2 on grey levels, cosine lr, "
                          "10 Gaussians per class fitted as the prior after training", fmnist_cond),
    "rgb64": Preset("conv VAE (32,64,128,256)-512-64 for 64x64 RGB images, cosine lr, 30 epochs", rgb64),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise VaegenError(f"--preset={name!r} is unknown (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset_job(name: str, **job_fields: Any) -> TrainJobConfig:
    """The TrainJobConfig a preset describes, with job fields such as storage replaced."""
    return replace(get_preset(name).job(), **job_fields)


def layer_preset(name: str, job: TrainJobConfig, keep: set[str]) -> TrainJobConfig:
    """`job` with the preset under it: every setting the preset makes (one that differs from the dataclass
    default) replaces job's, except the settings named in `keep` (dotted paths such as "train.epochs" or "name":
    the ones a flag or a config file set). On a dataset other than the recipe's own the model is named
    `<preset>-<dataset>`: a name is bound to one dataset (cluster/store/name_binding.py), so the preset's own name
    stays its documented model's."""
    preset = get_preset(name).job()
    layered = _layer(preset, type(job)(), job, keep, "")
    if "name" not in keep and layered.dataset != preset.dataset:
        layered = replace(layered, name=f"{preset.name}-{layered.dataset}"[:MAX_NAME])
    return layered


def _layer(preset: Any, default: Any, job: Any, keep: set[str], prefix: str) -> Any:
    changes = {}
    for f in dataclasses.fields(job):
        path = prefix + f.name
        ours, base, theirs = getattr(preset, f.name), getattr(default, f.name), getattr(job, f.name)
        if dataclasses.is_dataclass(ours) and dataclasses.is_dataclass(theirs):
            changes[f.name] = _layer(ours, base, theirs, keep, path + ".")
        elif ours != base and path not in keep:
            changes[f.name] = ours
    return replace(job, **changes)
