"""How a model version's grids are laid out (samples.png, recon.png, samples/sample_N.png), and the captions that
say so beside them in the gallery. Plain values, no torch: vae_core.artifacts draws the grids by them, and
`vaegen show` captions them without loading the model code."""
from __future__ import annotations

from typing import Any

SAMPLES = 64                  # an 8 x 8 grid of unconditional samples
PER_CLASS = 8                 # a conditional grid: a row of this many per class
NROW = 8                      # images a row: make_grid's default


def samples_caption(model_cfg: Any) -> str:
    if getattr(model_cfg, "conditional", False):
        return (f"decoder means of latents from the prior: one row per class (row 1 = class 0), "
                f"{PER_CLASS} samples each")
    return f"{SAMPLES} decoder means of latents from the prior, {NROW} a row"


def epoch_samples_caption(model_cfg: Any) -> str:
    layout = (f"one row per class, {PER_CLASS} each" if getattr(model_cfg, "conditional", False)
              else f"{SAMPLES} samples, {NROW} a row")
    return f"the same latents from N(0, I) decoded after each epoch ({layout}), as in PyTorch's VAE example"


RECON_CAPTION = ("odd rows (1st, 3rd, ...): validation images; the row below each: their reconstructions "
                 "(decoder mean at the posterior mean)")
