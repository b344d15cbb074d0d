"""Model checkpoints as two files: weights (safetensors: tensors only, no pickle) and config.json (the
ModelConfig plus the weights' sha256). Files are bytes here so the caller decides where they live."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from . import __version__
from .config import ModelConfig, from_dict, to_dict
from .errors import VaegenError
from .models import VAE, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_files(model: VAE, extra: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """{WEIGHTS_FILE: bytes, CONFIG_FILE: bytes}; `extra` (e.g. the training config) goes into config.json."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save_tensors(state)
    config = {"format_version": FORMAT_VERSION, "vaegen_version": __version__,
              "model": to_dict(model.cfg), "weights_sha256": sha256_hex(weights), **(extra or {})}
    return {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode()}


def read_config(config_bytes: bytes) -> dict[str, Any]:
    try:
        config = json.loads(config_bytes)
        config["model"] = from_dict(ModelConfig, config["model"])
    except (ValueError, KeyError, TypeError, VaegenError) as e:
        raise VaegenError(f"checkpoint config.json is unreadable: {e}") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise VaegenError(f"checkpoint format {config.get('format_version')} is not supported "
                          f"(this vaegen reads format {FORMAT_VERSION})")
    return config


def load_checkpoint(files: Mapping[str, bytes], expected: ModelConfig | None = None) -> tuple[VAE, dict[str, Any]]:
    """Rebuild the model; refuse tampered weights, and a config other than `expected` when given."""
    config = read_config(files[CONFIG_FILE])
    weights = files[WEIGHTS_FILE]
    if sha256_hex(weights) != config.get("weights_sha256"):
        raise VaegenError("checkpoint weights fail their sha256 check (corrupt or tampered); refusing to load")
    model_cfg: ModelConfig = config["model"]
    if expected is not None and expected != model_cfg:
        diffs = [f"{k}: checkpoint {v!r} vs expected {getattr(expected, k)!r}"
                 for k, v in to_dict(model_cfg).items() if to_dict(expected)[k] != v]
        raise VaegenError(f"checkpoint does not match the model config ({'; '.join(diffs)})")
    try:
        state = load_tensors(weights)
    except SafetensorError as e:
        raise VaegenError(f"checkpoint weights are unreadable: {e}") from None
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise VaegenError(f"checkpoint weights do not fit the model its config describes: {first}") from None
    return model.eval(), config
