"""Single-process training on real Fashion-MNIST, early stopping, and checkpoints that refuse tampering."""
import dataclasses
import json

import pytest
import torch

from vae_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, checkpoint_files, load_checkpoint
from vae_core.config import ModelConfig, TrainConfig, from_dict, to_dict
from vae_core.errors import VaegenError
from vae_core.models import build_model
from vae_core.train import EarlyStopping, ImageSet, evaluate, fit, iterate_batches, split_train_val

FMNIST = ModelConfig(image_shape=(1, 28, 28))


@pytest.fixture(scope="module")
def real_2000(small_fashion):
    (images, labels), _ = small_fashion
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def test_one_epoch_lowers_validation_loss(real_2000):
    train, val = split_train_val(real_2000, 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model(FMNIST)
    cfg = TrainConfig(epochs=1, batch_size=64)
    before = evaluate(model, iterate_batches(val, 512), cfg)["loss"]
    result = fit(model, train, val, cfg)
    after = evaluate(model, iterate_batches(val, 512), cfg)["loss"]
    assert after < before - 100, (before, after)            # ~543 → ~330 nats on 1,600 images
    assert result.history[0].val_loss == pytest.approx(after)
    assert result.history[0].images_per_s > 0


def test_early_stopping_restores_the_best_epoch(real_2000):
    train, val = split_train_val(real_2000, 0.2, seed=0)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(FMNIST, hidden_dim=64))
    # A learning rate this high makes later epochs worse: early stopping must stop and roll back.
    result = fit(model, train, val, TrainConfig(epochs=8, lr=0.05, patience=2, batch_size=64))
    best = min(result.history, key=lambda m: m.val_loss)
    assert result.best_epoch == best.epoch and result.best_val_loss == best.val_loss
    restored = evaluate(model, iterate_batches(val, 512), TrainConfig())["loss"]
    assert restored == pytest.approx(best.val_loss, rel=1e-5)
    assert result.stopped_early and result.best_epoch < 8 - 2
    assert len(result.history) == result.best_epoch + 1 + 2          # patience 2: two worse epochs, then stop


def test_fused_and_for_loop_adam_take_the_same_steps_up_to_rounding(real_2000):
    """--adam fused (the default) and for-loop are one algorithm: after an epoch of 25 steps on real images the
    weights differ by rounding only (2e-7 when written), while training moved them by 0.03."""
    train, val = split_train_val(real_2000, 0.2, seed=0)
    weights, moved = {}, {}
    for adam in ("fused", "for-loop"):
        torch.manual_seed(0)
        model = build_model(FMNIST)
        start = [p.detach().clone() for p in model.parameters()]
        fit(model, train, val, TrainConfig(epochs=1, batch_size=64, adam=adam))
        weights[adam] = [p.detach() for p in model.parameters()]
        moved[adam] = max((p - s).abs().max().item() for p, s in zip(weights[adam], start))
    rounding = max((a - b).abs().max().item() for a, b in zip(weights["fused"], weights["for-loop"]))
    assert rounding < 1e-5 and moved["fused"] > 1e-2, (rounding, moved)


def test_early_stopping_state_round_trips():
    model = build_model(dataclasses.replace(FMNIST, hidden_dim=8))
    stopper = EarlyStopping(patience=2)
    stopper.step(0, 10.0, model)
    stopper.step(1, 11.0, model)
    clone = EarlyStopping(patience=2)
    clone.load_state_dict(stopper.state_dict())
    assert (clone.best_loss, clone.best_epoch, clone.bad_epochs) == (10.0, 0, 1)
    assert clone.step(2, 12.0, model) is True


def test_checkpoint_round_trip_is_bit_exact():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(FMNIST, num_classes=10, arch="conv"))
    loaded, config = load_checkpoint(checkpoint_files(model, extra={"note": "x"}), expected=model.cfg)
    assert config["note"] == "x" and loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_tampered_weights_are_refused():
    files = checkpoint_files(build_model(FMNIST))
    weights = bytearray(files[WEIGHTS_FILE])
    weights[-1] ^= 0xFF
    with pytest.raises(VaegenError, match="sha256"):
        load_checkpoint({**files, WEIGHTS_FILE: bytes(weights)})


def test_mismatched_config_is_refused():
    files = checkpoint_files(build_model(FMNIST))
    with pytest.raises(VaegenError, match="latent_dim: checkpoint 20 vs expected 16"):
        load_checkpoint(files, expected=dataclasses.replace(FMNIST, latent_dim=16))


def test_config_that_lies_about_the_weights_is_refused():
    files = checkpoint_files(build_model(FMNIST))
    config = json.loads(files[CONFIG_FILE])
    config["model"]["hidden_dim"] = 100                     # weights still 400 wide
    with pytest.raises(VaegenError, match="do not fit the model"):
        load_checkpoint({**files, CONFIG_FILE: json.dumps(config).encode()})


def test_config_dicts_round_trip_and_refuse_unknown_keys():
    cfg = TrainConfig(epochs=3, binarize=True)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert from_dict(ModelConfig, to_dict(FMNIST)) == FMNIST
    with pytest.raises(VaegenError, match="unknown TrainConfig key\\(s\\): epoch"):
        from_dict(TrainConfig, {"epoch": 3})
    with pytest.raises(VaegenError, match="TrainConfig.epochs must be int"):
        from_dict(TrainConfig, {"epochs": "3"})


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "--epochs=0"), ({"epochs": -1}, "--epochs=-1"),
    ({"batch_size": 0}, "--batch-size=0"), ({"batch_size": -5}, "--batch-size=-5"),
    ({"adam": "foreach"}, "--adam='foreach' must be one of fused, for-loop"),
])
def test_invalid_train_config_names_the_flag(kwargs, message):
    with pytest.raises(VaegenError, match=message):
        TrainConfig(**kwargs)
