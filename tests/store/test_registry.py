"""The model registry under crashes and bad input: a named run's publish is idempotent, corrupt pointers and
metrics are one clear line, and version strings are checked strictly. Real storage (a local root and S3 over
HTTP via moto), real model files."""
from __future__ import annotations

import dataclasses

import pytest
from threads import all_at_once

from cluster.store.records import CorruptRecord
from cluster.store.registry import Registry, decisions, parse_model_spec, swap_champion
from cluster.store.storage import Storage
from jobs.cli import main as vaegen
from vae_core.checkpoint import CONFIG_FILE, checkpoint_files
from vae_core.config import ModelConfig
from vae_core.errors import VaegenError
from vae_core.models import build_model

TINY = ModelConfig(image_shape=(1, 28, 28), hidden_dim=16, latent_dim=2)


def version_files(hidden_dim: int = 16) -> dict[str, bytes]:
    files = checkpoint_files(build_model(dataclasses.replace(TINY, hidden_dim=hidden_dim)))
    return {**files, "metrics.json": b'{"test_loss": 1.0, "history": []}'}


class Crash(BaseException):
    """A process dying at this point: nothing after it runs (not an Exception, so nothing catches it)."""


def test_a_run_that_crashed_mid_publish_finishes_the_same_version_on_its_rerun(storage_config, monkeypatch):
    registry = Registry(Storage(storage_config))
    registry.publish("m", version_files())                              # someone else's v0001
    real_publish = Storage.publish

    def dies_before_config(self, key, data, **kwargs):
        if key.endswith(f"/{CONFIG_FILE}"):
            raise Crash()
        return real_publish(self, key, data, **kwargs)

    monkeypatch.setattr(Storage, "publish", dies_before_config)
    with pytest.raises(Crash):
        registry.publish("m", version_files(), run_id="run-1")
    monkeypatch.setattr(Storage, "publish", real_publish)
    assert registry.versions("m") == ["v0001"]                           # the half-written one is invisible

    ref = registry.publish("m", version_files(), run_id="run-1")         # the rerun
    again = registry.publish("m", version_files(), run_id="run-1")       # and a rerun after it finished
    assert ref.version == again.version == "v0002"
    assert registry.versions("m") == ["v0001", "v0002"]
    assert registry.load(ref).model.cfg.hidden_dim == 16
    other = registry.publish("m", version_files(), run_id="run-2")       # another run: its own version
    assert other.version == "v0003"


def test_a_rerun_after_a_complete_publish_writes_nothing(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    first = registry.publish("m", version_files(hidden_dim=16), run_id="run-1")
    # A rerun that trained to other weights must not overwrite the version readers may already use.
    second = registry.publish("m", version_files(hidden_dim=24), run_id="run-1")
    assert first == second and registry.versions("m") == ["v0001"]
    assert registry.load(first).model.cfg.hidden_dim == 16


def test_a_corrupt_run_reservation_is_one_clear_line(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", version_files(), run_id="run-1")
    registry.storage.publish("models/m/runs/run-1.json", b'{"versi')
    with pytest.raises(VaegenError, match=r"models/m/runs/run-1\.json is corrupt \(not valid JSON.*delete it") as e:
        registry.publish("m", version_files(), run_id="run-1")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("body, problem", [
    (b"", "is corrupt (empty)"),
    (b'{"version": "v00', "is corrupt (not valid JSON"),
    (b'{"version": 3}', "is corrupt (field 'version' is not a string)"),
    (b'["v0001"]', "is corrupt (a field has the wrong type)"),
    (b'{"version": "../../etc"}', "is corrupt (field 'version' is not a version name"),
    (b'{"version": "v0001", "value": "many"}', "is corrupt (field 'value' is not a number"),
    (b'{"version": "v0001", "value": 1e308}', "is corrupt (field 'value' is not a number"),
    (b'{"version": "v0001", "metric": ["test_loss"]}', "is corrupt (field 'metric' is not a string or null)"),
])
def test_a_corrupt_champion_pointer_is_one_line_naming_the_file_and_the_fix(local_storage_config, body, problem):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", version_files())
    registry.storage.publish("models/m/champion.json", body)
    for call in (lambda: registry.champion("m"), lambda: registry.resolve("m@champion"),
                 lambda: registry.resolve("m")):
        with pytest.raises(CorruptRecord) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and message.startswith(registry.storage.uri_of("models/m/champion.json"))
        assert problem in message and "delete it" in message
    assert registry.resolve("m@latest").version == "v0001"             # the rest of the registry still reads


def test_a_corrupt_champion_pointer_through_the_cli(local_storage_config, capsys, tmp_path):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", version_files())
    registry.storage.publish("models/m/champion.json", b'{"version": "v0')
    code = vaegen(["sample", "--model", "m@champion", "--root", local_storage_config.root,
                   "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("vaegen: error: ")
    assert "champion.json is corrupt (not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "s.png").exists()


def test_truncated_metrics_are_one_line_naming_the_file(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    ref = registry.publish("m", version_files())
    registry.storage.publish("models/m/v0001/metrics.json", b'{"test_loss": 1.0, "hist')
    with pytest.raises(VaegenError, match=r"models/m/v0001/metrics\.json is corrupt \(not valid JSON") as e:
        registry.metrics(ref)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("file, body, problem", [
    ("metrics.json", b'{"test_loss": "251.5"}', "field 'test_loss' is not a number, NaN or Infinity"),
    ("metrics.json", b'{"test_loss": 1e308}', "field 'test_loss' is not a number"),
    ("metrics.json", b'{"best_epoch": 9223372036854775808}', "field 'best_epoch' is not a count"),
    ("metrics.json", b'{"history": [{"epoch": 0, "loss": 1.0}]}', "no field 'val_loss'"),
    ("metrics.json", b'{"history": {"epoch": 0}}', "field 'history' is not a list"),
    ("config.json", b'{"model": ["mlp"]}', "field 'model' is not an object"),
    ("config.json", b'{"weights_sha256": "ab"}', "no field 'model'"),
    ("config.json", b'{"model": {"num_classes": null}}', "field 'num_classes' is not a count"),
])
def test_a_version_record_of_the_wrong_shape_is_one_line_naming_the_file(local_storage_config, file, body, problem):
    registry = Registry(Storage(local_storage_config))
    ref = registry.publish("m", version_files())
    registry.storage.publish(f"models/m/v0001/{file}", body)
    read = registry.metrics if file == "metrics.json" else registry.config
    with pytest.raises(CorruptRecord) as e:
        read(ref)
    message = str(e.value)
    assert message.startswith(registry.storage.uri_of(f"models/m/v0001/{file}")) and problem in message, message
    assert "\n" not in message


def test_metrics_of_a_run_that_diverged_are_read_as_written(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    ref = registry.publish("m", version_files())
    registry.storage.publish("models/m/v0001/metrics.json", b'{"test_loss": NaN, "best_val_loss": Infinity}')
    assert str(registry.metrics(ref)["test_loss"]) == "nan" and registry.metrics(ref)["best_val_loss"] > 1e308


def test_a_decision_record_of_the_wrong_shape_is_marked_and_the_rest_read(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    folder = "models/m/decisions"
    registry.storage.publish(f"{folder}/20250101T000000.000000Z-aaaa.json",
                             b'{"decision": "keep", "challenger": {"version": "v0002", "metric": "nan"}}')
    registry.storage.publish(f"{folder}/20250102T000000.000000Z-bbbb.json", b'{"decision": 3}')
    registry.storage.publish(f"{folder}/20250103T000000.000000Z-cccc.json",
                             b'{"decision": "promote", "champion": {"version": "v0001", "metric": [1.0]}}')
    good, bad_decision, bad_side = decisions(registry, "m")
    assert good["challenger"]["metric"] == "nan"
    assert "field 'decision' is not a string" in bad_decision["corrupt"]
    assert "field 'metric' is not" in bad_side["corrupt"] and bad_side["file"].endswith("-cccc.json")


def test_a_swap_sees_a_pointer_of_the_wrong_shape_as_corrupt_as_readers_do(local_storage_config):
    from cluster.store.registry import CORRUPT_POINTER
    registry = Registry(Storage(local_storage_config))
    registry.storage.publish("models/m/champion.json", b'{"version": "v0001", "value": "many"}')
    with pytest.raises(CorruptRecord):
        registry.champion("m")
    assert not swap_champion(registry, "m", {"version": "v0002"}, expected_version="v0001")
    assert swap_champion(registry, "m", {"version": "v0002"}, expected_version=CORRUPT_POINTER)
    assert registry.champion("m")["version"] == "v0002"


def test_an_unreadable_decision_record_is_marked_not_fatal(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    registry.storage.publish("models/m/decisions/20250101T000000.000000Z-aaaa.json", b'{"decision": "keep"}')
    registry.storage.publish("models/m/decisions/20250102T000000.000000Z-bbbb.json", b'{"decis')
    good, bad = decisions(registry, "m")
    assert good == {"decision": "keep"} and "not valid JSON" in bad["corrupt"]


def test_a_swap_replaces_a_corrupt_pointer_only_while_it_is_still_corrupt(local_storage_config):
    from cluster.store.registry import CORRUPT_POINTER
    registry = Registry(Storage(local_storage_config))
    registry.storage.publish("models/m/champion.json", b"{trunc")
    assert not swap_champion(registry, "m", {"version": "v0002"}, expected_version=None)
    assert swap_champion(registry, "m", {"version": "v0002"}, expected_version=CORRUPT_POINTER)
    assert not swap_champion(registry, "m", {"version": "v0003"}, expected_version=CORRUPT_POINTER)
    assert registry.champion("m")["version"] == "v0002"


@pytest.mark.parametrize("spec, parsed", [
    ("m", ("m", "")), ("m@v0001", ("m", "v0001")), ("m@3", ("m", "3")), ("m@latest", ("m", "latest")),
    ("m@champion", ("m", "champion")), ("fm-vae.2@v12345", ("fm-vae.2", "v12345")),
])
def test_model_specs_vaegen_accepts(spec, parsed):
    assert parse_model_spec(spec) == parsed


@pytest.mark.parametrize("spec", [
    "m@", "m@v1", "m@V0001", "m@-1", "m@latest@x", "m@v0001/x", "m@../v0001", "m@champ", "m@\u0663",
    "m@ 3", "m@3 ", "@champion", "../m", "..", ".", "m/x@v0001", "", "m@99999999999999999999",
])
def test_malformed_model_specs_are_one_line(local_storage_config, spec):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", version_files())
    with pytest.raises(VaegenError) as e:
        registry.resolve(spec)
    message = str(e.value)
    assert "\n" not in message and "--model=" in message


# -- the first version of a name is its champion ---------------------------------------------------------------
def test_the_first_version_of_a_name_is_its_champion_recorded_as_a_decision(local_storage_config, capsys):
    """What makes `generate --model m@champion` work right after the first training (the README's first example):
    the publish crowns the name's first version, with a decision record the pointer names, like a retrain's."""
    registry = Registry(Storage(local_storage_config))
    assert registry.publish("m", version_files()).version == "v0001"
    pointer = registry.champion("m")
    assert pointer["version"] == "v0001" and pointer["value"] == 1.0
    (record,) = decisions(registry, "m")
    assert record["rule"] == "first-version" and record["decision"] == "promote"
    assert record["run_id"] in pointer["decision"] and record["challenger"]["version"] == "v0001"
    assert registry.publish("m", version_files(24)).version == "v0002"          # later versions: retrain's call
    assert [registry.resolve(s).version for s in ("m", "m@champion", "m@latest")] == ["v0001", "v0001", "v0002"]
    assert len(decisions(registry, "m")) == 1
    root = local_storage_config.root
    assert vaegen(["sample", "--model", "m@champion", "--count", "4", "--out", f"{root}/s.png", "--root", root]) == 0


def test_a_first_version_whose_score_is_not_finite_is_not_crowned_and_a_bare_name_says_so(local_storage_config,
                                                                                           capsys):
    registry = Registry(Storage(local_storage_config))
    registry.publish("m", {**version_files(), "metrics.json": b'{"test_loss": NaN, "history": []}'})
    assert registry.champion("m") is None
    (record,) = decisions(registry, "m")
    assert record["decision"] == "keep" and "not a finite number" in record["reason"]
    for spec in ("m", "m@champion"):                 # no silent fall-back to another version
        with pytest.raises(VaegenError, match="has no champion") as e:
            registry.resolve(spec)
        assert "m@latest (v0001)" in str(e.value) and "vaegen retrain --name m" in str(e.value)
    assert "a bare name means the champion" in str(pytest.raises(VaegenError, registry.resolve, "m").value)
    root = local_storage_config.root
    assert vaegen(["sample", "--model", "m", "--count", "4", "--out", f"{root}/s.png", "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no champion" in err


def test_first_versions_published_at_once_crown_exactly_one(storage_config):
    """Four runs publish a name's first versions together: one compare-and-swap lands, every record agrees."""
    registry = Registry(Storage(storage_config))
    all_at_once(4, lambda i: registry.publish("m", version_files(16 + i), run_id=f"run-{i}"))
    assert len(registry.versions("m")) == 4
    pointer = registry.champion("m")
    promoted = [r for r in decisions(registry, "m") if r["decision"] == "promote"]
    assert [r["challenger"]["version"] for r in promoted] == [pointer["version"]]
    assert all(r["decision"] in ("promote", "keep") for r in decisions(registry, "m"))
    assert any(promoted[0]["run_id"] in pointer["decision"] for _ in [0])
