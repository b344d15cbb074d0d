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
from .names import CONFIG_FILE, WEIGHTS_FILE

FORMAT_VERSION = 2      # a version's files; 2: config.json's training job names no root, the page is _gallery.html


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
    mismatch = state_mismatch(state, model.state_dict())
    if mismatch:
        raise VaegenError(f"checkpoint weights do not fit the model its config describes ({mismatch}); "
                          "config.json and model.safetensors come from different models")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:                    # anything state_mismatch did not foresee, still on one line
        raise VaegenError(f"checkpoint weights do not fit the model its config describes: {one_line(e)}") from None
    return model.eval(), config


def state_mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any], shown: int = 4) -> str:
    """What load_state_dict would complain about, condensed onto one line: missing and unexpected tensor
    names and shape mismatches (the first `shown` of each, then a count); "" when the weights fit."""
    def names(items: list[str]) -> str:
        more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    def shape(t: Any) -> str:
        return "x".join(map(str, t.shape)) or "scalar"

    missing = sorted(set(wanted) - set(found))
    unexpected = sorted(set(found) - set(wanted))
    resized = [f"{k} {shape(found[k])} in the file vs {shape(wanted[k])} in the config"
               for k in sorted(set(found) & set(wanted)) if tuple(found[k].shape) != tuple(wanted[k].shape)]
    parts = [f"{label}: {names(items)}" for label, items in (
        ("missing from the file", missing), ("not in the model", unexpected), ("shape mismatch", resized)) if items]
    return "; ".join(parts)


def one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
