"""Generation on real local Ray into a local folder and a moto S3 server: every id exactly once, manifest
checksums that match the objects, the same bytes for any worker count, and resume after corruption."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from generate_support import IMAGE_SHAPE, all_rows, publish_tiny_model, shard_objects

from cluster.data.datasets import ingest
from cluster.generate.commit import STALE_TEMP_S, ShardLedger, commit, read_committed_manifest, verified_shards
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.generate.lease import JobLease
from cluster.generate.plan import JobPlan, plan_job
from cluster.generate.pool import start_workers
from cluster.generate.settings import RunSettings
from cluster.generate.shards import ShardMaker
from cluster.generate.writers import parquet_image_bytes
from cluster.store.layout import SUCCESS, JobKeys, shard_name
from cluster.store.records import sha256_hex
from cluster.store.registry import Registry
from cluster.store.storage import Storage, open_storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError
from vae_core.images import to_uint8
from vae_core.models import build_model
from vae_core.use_configs import GenerateConfig

LOCAL_AND_SLOW_S3 = pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])


def samples(**overrides) -> GenerateConfig:
    return GenerateConfig(**{"model": "tiny", "count": 50, "shard_size": 16, "seed": 7, **overrides})


def test_every_id_once_and_manifest_matches_the_objects(ray_local, storage_config):
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    manifest = run_generation(samples(), storage_config, workers=2, progress=False)

    assert [s["name"] for s in manifest["shards"]] == [shard_name(i, "parquet", 4, "train") for i in range(4)]
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 2]
    objects = shard_objects(storage, manifest)
    assert {k: sha256_hex(v) for k, v in objects.items()} == {s["name"]: s["sha256"] for s in manifest["shards"]}
    rows = all_rows(storage, manifest)
    assert sorted(rows["id"]) == list(range(50))
    assert {img.shape for img in rows["image"]} == {IMAGE_SHAPE}
    assert len({img.tobytes() for img in rows["image"]}) == 50            # 50 different latents, 50 images
    assert storage.exists(f"{manifest['prefix']}/{SUCCESS}")
    assert manifest["model"] == "tiny@v0001" and manifest["totals"] == {
        "rows": 50, "shards": 4, "bytes": sum(len(v) for v in objects.values())}


def test_png_shards_hold_the_same_pixels_as_parquet_shards(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    as_parquet = run_generation(samples(), local_storage_config, workers=2, progress=False)
    as_png = run_generation(samples(format="png"), local_storage_config, workers=2, progress=False)

    assert as_png["job_id"] != as_parquet["job_id"]
    assert [s["pixels_sha256"] for s in as_png["shards"]] == [s["pixels_sha256"] for s in as_parquet["shards"]]
    png_rows, parquet_rows = all_rows(storage, as_png), all_rows(storage, as_parquet)
    assert png_rows["id"] == parquet_rows["id"] == list(range(50))
    np.testing.assert_array_equal(np.stack(png_rows["image"]), np.stack(parquet_rows["image"]))


def test_one_or_two_workers_and_a_rerun_write_identical_bytes(ray_local, tmp_path):
    roots = [StorageConfig(root=str(tmp_path / name)) for name in ("one", "two")]
    for cfg in roots:
        publish_tiny_model(open_storage(cfg, for_writing=True))
    one = run_generation(samples(), roots[0], workers=1, progress=False)
    two = run_generation(samples(), roots[1], workers=2, progress=False)
    first = shard_objects(open_storage(roots[0]), one)
    assert first == shard_objects(open_storage(roots[1]), two)

    storage = open_storage(roots[1])                      # rerun from scratch: same job id, same bytes
    for entry in storage.list(two["prefix"], recursive=True):
        storage.delete(entry.key)
    again = run_generation(samples(), roots[1], workers=2, progress=False)
    assert again["job_id"] == one["job_id"] and again["run"]["shards_written"] == 4
    assert shard_objects(storage, again) == first


def test_rerun_of_a_finished_job_changes_nothing(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    first = run_generation(samples(), local_storage_config, workers=2, progress=False)
    committed = storage.read_bytes(JobKeys(first["prefix"]).manifest)
    again = run_generation(samples(), local_storage_config, workers=2, progress=False)
    assert again["run"]["already_complete"] and again["run"]["shards_skipped"] == 4
    assert {**again, "run": first["run"]} == first
    assert storage.read_bytes(JobKeys(first["prefix"]).manifest) == committed      # nothing rewritten


@LOCAL_AND_SLOW_S3
def test_corrupt_and_truncated_shards_are_rewritten_on_resume(ray_local, request, where):
    storage_config = request.getfixturevalue(f"{where}_storage_config")
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    first = run_generation(samples(), storage_config, workers=2, progress=False)
    good = shard_objects(storage, first)
    prefix, keys = first["prefix"], JobKeys(first["prefix"])
    one, two, three = (shard_name(i, "parquet", 4, "train") for i in (1, 2, 3))
    storage.publish(keys.shard(one), good[one][:100])                                          # truncated
    flipped = bytearray(good[two])
    flipped[len(flipped) // 2] ^= 0xFF                                                         # same size
    storage.publish(keys.shard(two), bytes(flipped))
    storage.delete(keys.shard(three))                                                          # missing

    again = run_generation(samples(), storage_config, workers=2, progress=False)
    assert (again["run"]["shards_written"], again["run"]["shards_skipped"]) == (3, 1)
    assert shard_objects(storage, again) == good
    assert again["shards"] == first["shards"] and storage.exists(f"{prefix}/{SUCCESS}")


def test_conditional_samples_cycle_through_the_chosen_labels(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage, "cond", num_classes=3)
    manifest = run_generation(samples(model="cond", labels=(2, 0)), local_storage_config, progress=False)
    rows = all_rows(storage, manifest)
    assert rows["label"] == [(2, 0)[i % 2] for i in range(50)]
    assert manifest["labels"] == [2, 0]


def test_a_fitted_class_prior_is_what_samples_are_drawn_from(ray_local, local_storage_config):
    """A model whose prior was fitted (vaegen train --prior-components) generates from that prior: here
    class c's Gaussian sits at z = (10c, 10c, 10c, 10c), so each row's stored latent shows where it came from."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=IMAGE_SHAPE, hidden_dim=32, latent_dim=4, num_classes=3,
                                    prior_components=1))
    model.prior.load(torch.zeros(3, 1), 10.0 * torch.arange(3.0).view(3, 1, 1).expand(3, 1, 4),
                     0.1 * torch.eye(4).repeat(3, 1, 1, 1))
    storage = open_storage(local_storage_config, for_writing=True)
    Registry(storage).publish("fitted", checkpoint_files(model))
    rows = all_rows(storage, run_generation(samples(model="fitted", count=60), local_storage_config, progress=False))
    latents, labels = np.array(rows["latent"]), np.array(rows["label"])
    for c in range(3):
        np.testing.assert_allclose(latents[labels == c].mean(0), 10.0 * c, atol=0.1)
        assert latents[labels == c].std(0).max() < 0.2


def test_a_gaussian_model_samples_its_pixel_noise_unless_asked_for_the_mean(ray_local, local_storage_config):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=IMAGE_SHAPE, hidden_dim=32, latent_dim=4, likelihood="gaussian",
                                    sigma=0.1))
    storage = open_storage(local_storage_config, for_writing=True)
    Registry(storage).publish("gauss", checkpoint_files(model))
    noisy = run_generation(samples(model="gauss"), local_storage_config, progress=False)
    means = run_generation(samples(model="gauss", pixels="mean"), local_storage_config, progress=False)
    assert means["job_id"] != noisy["job_id"]
    noisy_rows, mean_rows = all_rows(storage, noisy), all_rows(storage, means)
    np.testing.assert_array_equal(noisy_rows["latent"], mean_rows["latent"])          # the same z, decoded twice
    expected = to_uint8(model.generate(torch.from_numpy(np.array(mean_rows["latent"], dtype=np.float32))))
    assert np.abs(np.stack(mean_rows["image"]).astype(int) - expected.astype(int)).max() <= 1    # float rounding
    noise = (np.stack(noisy_rows["image"]).astype(float) - np.stack(mean_rows["image"])) / 255
    assert 0.08 < noise.std() < 0.12                                                   # σ = 0.1, a little clipped
    with pytest.raises(VaegenError, match="--pixels applies to samples"):
        GenerateConfig(model="gauss", kind="reconstructions", dataset="fm", pixels="mean")


@LOCAL_AND_SLOW_S3
def test_reconstructions_mirror_the_input_shards(ray_local, request, where, small_fashion):
    storage_config = request.getfixturevalue(f"{where}_storage_config")
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    _, (test_images, test_labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:45], test_labels[:45])},
                                       tuple("abcdefghij"), "test"), shard_rows=20, progress=False)
    spec = GenerateConfig(model="tiny", kind="reconstructions", dataset="fm", split="test", format="png")
    manifest = run_reconstruction(spec, storage_config, progress=False)

    assert [(s["rows"], s["first_id"], s["last_id"]) for s in manifest["shards"]] == [(20, 0, 19), (20, 20, 39),
                                                                                       (5, 40, 44)]
    rows = all_rows(storage, manifest)
    assert rows["id"] == list(range(45)) and rows["label"] == test_labels[:45].tolist()
    model = Registry(storage).load("tiny").model
    import torch
    recon, mu = model.reconstruct(torch.from_numpy(test_images[:45]).float() / 255.0)
    np.testing.assert_allclose(np.array(rows["latent"]), mu.numpy(), atol=1e-5)
    expected = (recon.numpy() * 255).round()
    assert np.abs(np.stack(rows["image"]).astype(float) - expected).max() <= 1     # float rounding at most


def test_job_id_is_the_spec_with_the_model_resolved(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    assert plan_job(samples(model="tiny@v0001"), storage).job_id == plan.job_id
    assert plan_job(samples(seed=8), storage).job_id != plan.job_id
    publish_tiny_model(storage, seed=1)                    # a new version; "tiny" still means the champion, v0001
    assert plan_job(samples(), storage).job_id == plan.job_id
    assert plan_job(samples(model="tiny@latest"), storage).job_id != plan.job_id


def test_a_plan_crosses_a_process_boundary_as_plain_json(local_storage_config, small_fashion):
    """Actors get the plan as a plain dict (config.py's rule): JSON and back gives the very same plan."""
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage, "cond", num_classes=10)
    (images, labels), _ = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(images[:40], labels[:40])}, tuple("abcdefghij"), "test"),
           shard_rows=16, progress=False)
    for spec in (samples(model="cond", labels=(3, 1)), GenerateConfig(model="cond", kind="reconstructions",
                                                                       dataset="fm", format="png")):
        plan = plan_job(spec, storage)
        assert JobPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


BAD_SPECS = [
    (dict(model="nope"), "no model named 'nope'"),
    (dict(model="tiny@v0009"), "has no version 'v0009'"),
    (dict(count=0), "--count=0 must be > 0"),
    (dict(count=-5), "--count=-5 must be > 0"),
    (dict(shard_size=0), "--shard-size=0 must be > 0"),
    (dict(format="gif"), "--format='gif' must be one of parquet, png, jpeg"),
    (dict(labels=(1,)), "not class-conditional: drop --labels"),
    (dict(model="cond", labels=(0, 3)), r"--labels \[3\] outside cond@v0001's 3 classes"),
    (dict(count=10**9, shard_size=1), "makes 1,000,000,000 shards; at most 100,000"),
    (dict(count=3_000_000, shard_size=3_000_000), "a Parquet shard of 3,000,000 1x28x28 images holds "
                                                  f"{3_000_000 * parquet_image_bytes((1, 28, 28)):,} image bytes, "
                                                  "over the format's 2 GiB"),
]


@pytest.mark.parametrize("overrides, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_are_one_clear_error_and_publish_nothing(local_storage_config, overrides, message):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    publish_tiny_model(storage, "cond", num_classes=3)
    with pytest.raises(VaegenError, match=message):
        run_generation(samples(**overrides), local_storage_config, progress=False)
    assert storage.list("outputs", recursive=True) == []


def test_weights_failing_their_sha256_are_refused(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    weights = storage.read_bytes("models/tiny/v0001/model.safetensors")
    storage.publish("models/tiny/v0001/model.safetensors", weights[:-4] + b"\0\0\0\0")
    with pytest.raises(VaegenError, match="fail their sha256 check"):
        run_generation(samples(), local_storage_config, progress=False)
    assert storage.list("outputs", recursive=True) == []


@pytest.mark.parametrize("settings, message", [
    (dict(workers=0), "--workers=0 must be between 1 and 1024"),
    (dict(workers=5000), "--workers=5000 must be between 1 and 1024"),
    (dict(cpus_per_worker=-1), "--cpus-per-worker and --gpus-per-worker must be in 0..1024"),
    (dict(max_restarts=-1), "--max-restarts=-1 must be >= 0")])
def test_bad_run_settings_are_one_clear_error_before_any_work(local_storage_config, settings, message):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    with pytest.raises(VaegenError, match=message):
        run_generation(samples(), local_storage_config, **{"workers": 2, **settings})
    with pytest.raises(VaegenError, match=message):
        RunSettings(**settings)
    assert storage.list("outputs", recursive=True) == []


def test_unwritable_root_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VaegenError, match="is not writable"):
        run_generation(samples(), StorageConfig(root=str(tmp_path / "file" / "root")), progress=False)


def test_workers_the_cluster_cannot_place_fail_fast(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    with pytest.raises(VaegenError, match="cannot place 2 DecoderWorker.*GPU"):
        run_generation(samples(), local_storage_config, workers=2, gpus_per_worker=1, progress=False)
    assert not storage.exists(f"outputs/{plan_job(samples(), storage).job_id}/{SUCCESS}")


def test_cli_bad_input_is_one_line_and_exit_2(local_storage_config, capsys):
    from jobs.cli import main
    code = main(["generate", "--model", "tiny", "--count", "0", "--root", local_storage_config.root])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "vaegen: error: --count=0 must be > 0"


def test_cli_a_billion_one_sample_shards_is_one_line_and_exit_2(local_storage_config, capsys):
    from jobs.cli import main
    publish_tiny_model(open_storage(local_storage_config, for_writing=True))
    code = main(["generate", "--model", "tiny", "--count", "1000000000", "--shard-size", "1",
                 "--root", local_storage_config.root, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "1,000,000,000 shards; at most 100,000" in err and err.count("\n") == 0
    assert err.startswith("vaegen: error: ")


def test_parquet_shards_stop_below_2_gib_of_images_and_png_tars_do_not(local_storage_config):
    """Parquet's binary column (the one Hugging Face's Image feature reads) has 32-bit offsets: the plan takes the
    largest shard that fits (as many 28x28 images as fit, each a stored PNG file) and refuses one image more."""
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    most = (2**31 - 1) // parquet_image_bytes((1, 28, 28))
    assert plan_job(samples(count=most, shard_size=most), storage).num_shards == 1
    with pytest.raises(VaegenError, match=f"over the format's 2 GiB column limit: use --shard-size {most:,} or less"):
        plan_job(samples(count=most + 1, shard_size=most + 1), storage)
    assert plan_job(samples(count=most + 1, shard_size=most + 1, format="png"), storage).num_shards == 1


def test_editing_config_json_in_place_makes_a_new_job(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    before = plan_job(samples(), storage)
    key = "models/tiny/v0001/config.json"
    config = json.loads(storage.read_bytes(key))
    storage.publish(key, json.dumps({**config, "note": "edited in place"}, indent=2, sort_keys=True).encode())
    after = plan_job(samples(), storage)
    assert after.job_id != before.job_id and after.weights_sha256 == before.weights_sha256
    assert after.config_sha256 == sha256_hex(storage.read_bytes(key)) != before.config_sha256


def test_a_worker_refuses_a_model_that_changed_under_the_job(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    key = "models/tiny/v0001/config.json"
    storage.publish(key, storage.read_bytes(key) + b"\n")                   # same model, other bytes
    with pytest.raises(VaegenError) as refused:
        start_workers(plan, local_storage_config, RunSettings(workers=1, max_restarts=0))
    message = str(refused.value)
    assert "\n" not in message and "tiny@v0001 changed under job" in message and "config.json sha256" in message


# -- exactly once under contention, without Ray: the shard protocol's pieces interleaved by hand -------------
class InterleavedStorage(Storage):
    """A real storage root that runs `before(key)` ahead of chosen calls: another driver acting at the worst
    moment for this one, deterministically."""

    def __init__(self, cfg, *, on_list=None, on_publish=None) -> None:
        super().__init__(cfg)
        self.on_list, self.on_publish = on_list, on_publish

    def list(self, prefix, recursive=False):
        entries = super().list(prefix, recursive)
        if self.on_list:
            hook, self.on_list = self.on_list, None                         # once
            hook(prefix)
        return entries

    def publish(self, key, data, *, if_absent=False):
        if self.on_publish and self.on_publish[0](key):
            hook, self.on_publish = self.on_publish[1], None                # once
            hook(key)
        return super().publish(key, data, if_absent=if_absent)


def maker_for(storage, plan) -> ShardMaker:
    return ShardMaker(plan, storage, Registry(storage).load(plan.model_ref).model)


def finish(storage, plan, ledger, maker, run: dict) -> dict:
    for index in ledger.missing():
        ledger.add(maker.make(index), built=True)
    return commit(storage, plan, ledger, run)


def test_a_shard_published_between_the_resume_listings_is_kept_and_committed(storage_config):
    """The old race: the resume check listed shards, then receipts; a shard and its receipt published in between
    by another driver looked like a receipt without its shard, and the shard was deleted."""
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    other = maker_for(storage, plan)
    other.make(0)
    racing = InterleavedStorage(storage_config, on_list=lambda prefix: other.make(2))
    ledger = verified_shards(racing, plan)

    assert sha256_hex(storage.read_bytes(plan.shard_key(2))) == other.build(2)[1]["sha256"]      # not deleted
    manifest = finish(storage, plan, ledger, maker_for(storage, plan), {})
    assert read_committed_manifest(storage, plan.prefix) == manifest
    assert sorted(all_rows(storage, manifest)["id"]) == list(range(50))


def test_verification_deletes_nothing_and_a_repair_goes_through_the_publish_path(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    maker = maker_for(storage, plan)
    good = finish(storage, plan, ShardLedger(plan), maker, {})
    corrupt = storage.read_bytes(plan.shard_key(1))[:-10]
    storage.publish(plan.shard_key(1), corrupt)

    ledger = verified_shards(storage, plan)
    assert ledger.missing() == [1] and storage.read_bytes(plan.shard_key(1)) == corrupt      # left as it was
    assert maker.make(1)["published"]                                       # replaced: the sha256 differed
    again = commit(storage, plan, verified_shards(storage, plan), {})
    assert again["shards"] == good["shards"] and read_committed_manifest(storage, plan.prefix) == again


def test_interleaved_commits_end_with_success_naming_the_manifest_there(storage_config):
    """Driver B commits between driver A's manifest and A's _SUCCESS: without A reading its commit back,
    _SUCCESS would name A's manifest while B's sits there, and no reader would trust the job."""
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    finish(storage, plan, ShardLedger(plan), maker_for(storage, plan), {"driver": "first"})
    storage.delete(f"{plan.prefix}/{SUCCESS}")

    def driver_b_commits(key):
        commit(storage, plan, verified_shards(storage, plan), {"driver": "B"})
    driver_a = InterleavedStorage(storage_config, on_publish=(lambda key: key.endswith(SUCCESS), driver_b_commits))
    result = commit(driver_a, plan, verified_shards(storage, plan), {"driver": "A"})

    committed = read_committed_manifest(storage, plan.prefix)
    assert committed is not None and committed["shards"] == result["shards"]
    assert committed["run"]["driver"] in ("A", "B")


def test_the_commit_refuses_a_shard_that_vanished_during_the_run(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    maker, ledger = maker_for(storage, plan), ShardLedger(plan)
    for index in range(plan.num_shards):
        ledger.add(maker.make(index), built=True)
    storage.delete(plan.shard_key(3))
    with pytest.raises(VaegenError, match=rf"1 shard.*changed on storage during this run \({plan.shard_name(3)}\); "
                                          "nothing was committed"):
        commit(storage, plan, ledger, {})
    assert not storage.exists(plan.keys.success) and not storage.exists(plan.keys.manifest)


def test_the_commit_removes_only_stale_temp_files(local_storage_config):
    """A fresh dotfile is another run's publish in flight: the commit must leave it alone."""
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    folder = Path(storage.path(plan.keys.data))           # where Storage.publish makes a shard's temp file
    folder.mkdir(parents=True)
    fresh, stale = (folder / f".{Path(plan.shard_name(i)).name}.tmp-{tag}" for i, tag in ((1, "inflight"), (2, "dead")))
    fresh.write_bytes(b"half a shard")
    stale.write_bytes(b"half a shard")
    os.utime(stale, (time.time() - 2 * STALE_TEMP_S,) * 2)
    finish(storage, plan, ShardLedger(plan), maker_for(storage, plan), {})
    assert fresh.exists() and not stale.exists()


# -- the job lease: a second driver waits ------------------------------------------------------------------
def test_one_lease_holder_at_a_time_and_an_expired_lease_is_taken_over_once(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    first, second, third = (JobLease(storage, "outputs/job/_lease.json", ttl_s=30) for _ in range(3))
    assert first.try_acquire() is None
    assert second.try_acquire()["owner"] == first.owner                    # live: second must wait
    first.release()
    assert second.try_acquire() is None and third.try_acquire()["owner"] == second.owner
    second._stop.set()                                                      # second dies: no renewal, no release
    storage.publish("outputs/job/_lease.json", json.dumps({"owner": second.owner, "expires_at": 1.0}).encode())
    taken = [lease.try_acquire() is None for lease in (third, first)]
    assert taken == [True, False]                                           # one takeover, not two
    third.release()


@pytest.mark.parametrize("body", [
    b'{"owner": "x", "expires_at": 1e999}',                                    # inf: JSON's overflow
    json.dumps({"owner": "x", "expires_at": time.time() + 10 * 86_400}).encode(),
    json.dumps({"owner": "x", "expires_at": time.time() + 3600, "ttl_s": 30}).encode(),
    json.dumps({"owner": "x", "expires_at": time.time() + 3600, "ttl_s": 1e999}).encode(),
    json.dumps({"owner": ["x"], "expires_at": time.time() + 20}).encode(),
    json.dumps({"owner": "x", "expires_at": True}).encode(),
    b'{"owner": "x", "expires_at": NaN}',
    b'[1, 2]',
], ids=["inf", "10 days", "past its own ttl", "inf ttl", "owner a list", "bool", "nan", "not an object"])
def test_a_lease_no_driver_would_write_is_taken_over_not_waited_on(local_storage_config, body):
    storage = open_storage(local_storage_config, for_writing=True)
    storage.publish("outputs/job/_lease.json", body)
    lease = JobLease(storage, "outputs/job/_lease.json", ttl_s=30)
    assert lease.try_acquire() is None                                      # no wait: the lease is ours
    assert json.loads(storage.read_bytes("outputs/job/_lease.json"))["owner"] == lease.owner
    lease.release()


def test_a_live_lease_within_its_ttl_is_still_waited_on(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    holder = {"owner": "elsewhere:1:ab", "expires_at": time.time() + 600, "ttl_s": 600}
    storage.publish("outputs/job/_lease.json", json.dumps(holder).encode())
    assert JobLease(storage, "outputs/job/_lease.json", ttl_s=30).try_acquire() == holder


def test_a_held_lease_is_renewed_past_its_ttl(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    holder, other = JobLease(storage, "outputs/job/_lease.json", ttl_s=0.6), JobLease(storage, "outputs/job/_lease.json")
    with holder:
        assert holder.try_acquire() is None
        time.sleep(1.5)
        assert other.try_acquire()["owner"] == holder.owner
    assert other.try_acquire() is None                                     # released
    other.release()


def test_a_maker_decodes_the_next_shard_while_the_last_one_encodes_and_never_two_at_once(local_storage_config):
    """Overlap inside a worker: shard B decodes while shard A (its decoding done) encodes and publishes, decoding
    never runs for two shards at once, and both shards are byte for byte what one thread builds."""
    import threading
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(count=64, shard_size=32, decode_batch=8), storage)
    model = Registry(storage).load("tiny").model
    inside, most, guard = {}, [0], threading.Lock()       # thread -> decoder calls it is in (they nest)
    b_decodes, a_waited = threading.Event(), threading.Event()

    def counted(method):
        def call(*args, **kwargs):
            me = threading.current_thread().name
            with guard:
                inside[me] = inside.get(me, 0) + 1
                most[0] = max(most[0], sum(1 for n in inside.values() if n))
            try:
                return method(*args, **kwargs)
            finally:
                with guard:
                    inside[me] -= 1
        return call
    model.sample_images, model.generate = counted(model.sample_images), counted(model.generate)

    def pause(stage: str) -> None:                     # the drill hook's place: each stage entered, per thread
        name = threading.current_thread().name
        if name == "B" and stage == "decode":
            b_decodes.set()
            time.sleep(0.01)                           # let A's thread run meanwhile
        elif name == "A" and stage == "encode" and not a_waited.is_set():
            a_waited.set()
            B.start()
            assert b_decodes.wait(30), "shard B did not decode while shard A was encoding"
    maker = ShardMaker(plan, storage, model, pause=pause)
    records = {}
    A = threading.Thread(target=lambda: records.update(A=maker.make(0)), name="A")
    B = threading.Thread(target=lambda: records.update(B=maker.make(1)), name="B")
    A.start()
    A.join(60)
    B.join(60)
    assert b_decodes.is_set() and most[0] == 1
    serial = ShardMaker(plan, storage, Registry(storage).load("tiny").model)
    assert [records["A"]["sha256"], records["B"]["sha256"]] == [serial.build(i)[1]["sha256"] for i in (0, 1)]
    assert maker.stages == {} and maker.stage == "idle"


def test_a_decoder_worker_runs_two_shards_at_once(ray_local, local_storage_config, monkeypatch):
    """The actor takes its two in-flight shards together (one decoding while the other encodes or publishes),
    and they land as one undisturbed worker builds them."""
    import ray

    from cluster.generate.drill import STAGE_DELAY_ENV
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(samples(), storage)
    monkeypatch.setenv(STAGE_DELAY_ENV, "publish=1.0")
    (actor,) = start_workers(plan, local_storage_config, RunSettings(workers=1, cpus_per_worker=0.5,
                                                                      gpus_per_worker=0.0))
    try:
        futures = [actor.run_shard.remote(i) for i in (0, 1)]
        seen, deadline = set(), time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline and len(ray.wait(futures, timeout=0)[0]) < 2:
            seen = max(seen, set(ray.get(actor.status.remote()).get("stages", {})), key=len)
        records = ray.get(futures)
    finally:
        ray.kill(actor)
    assert len(seen) == 2, "the worker never had two shards in flight"
    serial = ShardMaker(plan, storage, Registry(storage).load("tiny").model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert [r["sha256"] for r in records] == [serial.build(i)[1]["sha256"] for i in (0, 1)]
    finally:
        torch.set_num_threads(threads)
