"""Storage: one API over a local folder and S3 (moto server over HTTP), atomic and durable publish (a local file
has the mode open() would give it, is fsynced, and a full disk is one line), clear errors."""
import os
import stat

import pytest
from threads import all_at_once

from cluster.store.storage import Storage, open_storage
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError


def test_publish_read_list_round_trip(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    assert storage.publish("a/b/one.bin", b"hello")
    storage.publish("a/two.bin", b"x" * 10)
    assert storage.read_bytes("a/b/one.bin") == b"hello"
    assert storage.exists("a/two.bin") and not storage.exists("a/missing.bin")
    assert [e.key for e in storage.list("a", recursive=True)] == ["a/b/one.bin", "a/two.bin"]
    assert [(e.key, e.size) for e in storage.list("a")] == [("a/two.bin", 10)]
    assert storage.list("nothing-here") == []


def test_publish_if_absent_keeps_the_first_object(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    assert storage.publish("k.bin", b"first", if_absent=True) is True
    assert storage.publish("k.bin", b"second", if_absent=True) is False
    assert storage.read_bytes("k.bin") == b"first"
    storage.publish("k.bin", b"third")                     # plain publish replaces
    assert storage.read_bytes("k.bin") == b"third"


def test_local_publish_leaves_no_temp_files(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    storage.publish("x/y.bin", b"data")
    storage.publish("x/y.bin", b"data2", if_absent=True)
    assert [e.key for e in storage.list("x")] == ["x/y.bin"]


def test_s3_listing_skips_directory_marker_keys(s3_storage_config):
    storage = open_storage(s3_storage_config, for_writing=True)
    storage.s3_client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/d/", Body=b"")   # another tool's
    storage.publish("d/real.bin", b"1")
    assert [e.key for e in storage.list("d")] == ["d/real.bin"]


def test_storage_pickles_without_its_client(s3_storage_config):
    import pickle
    storage = open_storage(s3_storage_config, for_writing=True)
    storage.publish("p.bin", b"1")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_bytes("p.bin") == b"1"


def test_endpoint_comes_from_aws_endpoint_url(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage = open_storage(StorageConfig(root="s3://vaegen-test/env-endpoint"), for_writing=True)
    assert storage.publish("e.bin", b"1") and storage.read_bytes("e.bin") == b"1"


@pytest.mark.parametrize("root, message", [
    ("gs://bucket/x", "unsupported storage URI scheme 'gs'"),
    ("s3:///no-bucket", "names no bucket"),
])
def test_bad_uris_are_refused(root, message):
    with pytest.raises(VaegenError, match=message):
        Storage(StorageConfig(root=root))


def test_missing_bucket_is_one_clear_error(s3_server):
    with pytest.raises(VaegenError, match="bucket 'no-such-bucket' does not exist"):
        open_storage(StorageConfig(root="s3://no-such-bucket/x", s3_endpoint=s3_server), for_writing=True)


def test_unreachable_endpoint_fails_fast(monkeypatch):
    from conftest import free_port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")            # credentials present: the endpoint is the problem
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = StorageConfig(root="s3://b/x", s3_endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VaegenError, match="cannot reach the S3 endpoint"):
        open_storage(cfg, for_writing=True)


def test_unwritable_local_root(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VaegenError, match="is not writable"):
        open_storage(StorageConfig(root=str(tmp_path / "file" / "root")), for_writing=True)


def test_reading_a_missing_key_names_it(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    with pytest.raises(VaegenError, match="missing.bin does not exist"):
        storage.read_bytes("missing.bin")


def test_compare_and_swap_writes_only_over_what_it_checked(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    assert storage.compare_and_swap("ptr.json", b"v1", lambda cur: cur is None)
    assert not storage.compare_and_swap("ptr.json", b"v2", lambda cur: cur is None)     # check refuses
    assert storage.compare_and_swap("ptr.json", b"v2", lambda cur: cur == b"v1")
    assert storage.read_bytes("ptr.json") == b"v2"


def test_compare_and_swap_loses_to_a_write_in_between(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    storage.publish("ptr.json", b"old")

    def sneaky_check(current):
        if storage.is_s3:
            storage.publish("ptr.json", b"theirs")      # another writer lands after our read
        return current == b"old"
    won = storage.compare_and_swap("ptr.json", b"ours", sneaky_check)
    if storage.is_s3:                                   # the ETag changed: our conditional PUT gets 412
        assert not won and storage.read_bytes("ptr.json") == b"theirs"
    else:                                               # locally the lock serialises writers instead
        assert won and storage.read_bytes("ptr.json") == b"ours"


def test_an_s3_publish_signs_the_body_sha256_instead_of_adding_a_crc(s3_storage_config):
    import hashlib
    storage = open_storage(s3_storage_config, for_writing=True)
    sent = []
    storage.s3_client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request))
    data = b"shard bytes" * 1000
    assert storage.publish("signed.bin", data, if_absent=True)
    headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in sent[0].headers.items()}
    assert headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()     # covered by the signature
    assert not any(k.startswith("x-amz-checksum-") for k in headers)
    assert storage.read_bytes("signed.bin") == data


def test_concurrent_publishes_claim_each_version_exactly_once(storage_config):
    """Four registries (as four drivers would) publish model 'm' at once. A barrier between each one's read of the
    taken numbers and its first claim forces the race: all four read 'none taken' and claim v0001 together. Exactly
    one wins it; the others move on to the next free numbers, each won exactly once; and every version holds the
    files of the publisher it was given to."""
    import threading

    from cluster.store.registry import CLAIM_FILE, Registry
    from vae_core.checkpoint import checkpoint_files
    from vae_core.config import ModelConfig
    from vae_core.models import build_model
    publishers = 4
    barrier = threading.Barrier(publishers, timeout=60)
    claims: list[tuple[str, int, bool]] = []          # (version, publisher, won)

    def racing_storage(p: int) -> Storage:
        storage = open_storage(storage_config, for_writing=True)
        publish, waited = storage.publish, []

        def publish_claims_together(key, data, **kw):
            is_claim = key.endswith(f"/{CLAIM_FILE}")
            if is_claim and not waited:
                waited.append(True)
                barrier.wait()                        # everyone has read the taken numbers; nobody has claimed
            won = publish(key, data, **kw)
            if is_claim:
                claims.append((key.rsplit("/", 2)[-2], p, won))
            return won
        storage.publish = publish_claims_together
        return storage
    registries = [Registry(racing_storage(p)) for p in range(publishers)]
    files = [checkpoint_files(build_model(ModelConfig(image_shape=(1, 8, 8), hidden_dim=4 + p, latent_dim=2)))
             for p in range(publishers)]
    refs = all_at_once(publishers, lambda p: registries[p].publish("m", files[p]))
    assert [p for v, p, _ in sorted(claims) if v == "v0001"] == list(range(publishers))   # all raced for v0001
    won = sorted((v, p) for v, p, w in claims if w)
    assert [v for v, _ in won] == ["v0001", "v0002", "v0003", "v0004"], claims          # one winner per number
    assert dict(won) == {ref.version: p for p, ref in enumerate(refs)}
    registry = Registry(open_storage(storage_config))
    assert registry.versions("m") == ["v0001", "v0002", "v0003", "v0004"]
    for p, ref in enumerate(refs):
        assert registry.read_file(ref, "model.safetensors") == files[p]["model.safetensors"]
        assert registry.load(f"m@{ref.version}").model.cfg.hidden_dim == 4 + p


# -- local files: mode, durability, a full disk ------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_path_and_keeps_what_was_written(small_disk):
    storage = open_storage(StorageConfig(root=str(small_disk(1 << 20))), for_writing=True)
    shard = os.urandom(600_000)
    assert storage.publish("data/shard-0.bin", shard, if_absent=True)

    for write in (lambda: storage.publish("data/shard-1.bin", shard, if_absent=True),    # a new shard
                  lambda: storage.publish("data/shard-0.bin", shard + b"!"),           # replacing one
                  lambda: storage.compare_and_swap("data/shard-0.bin", shard * 2, lambda current: True)):
        with pytest.raises(VaegenError) as refused:
            write()
        line = str(refused.value)
        assert line.startswith(f"no space left on the disk holding {storage.base}/data/"), line
        assert "free space and rerun to resume" in line and "\n" not in line
        # Nothing half-written: no temp file, no partial shard, and the shard already there is whole.
        leftovers = set(os.listdir(os.path.join(storage.base, "data"))) - {"shard-0.bin", "shard-0.bin.lock"}
        assert not leftovers, leftovers
        assert storage.read_bytes("data/shard-0.bin") == shard

    storage.delete("data/shard-0.bin")                     # space freed: the same write now lands
    assert storage.publish("data/shard-1.bin", shard, if_absent=True)

@pytest.fixture
def umask():
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_local_publish_gives_the_mode_open_would(local_storage_config, umask, mask, mode):
    storage = open_storage(local_storage_config, for_writing=True)
    umask(mask)
    storage.publish("out/plain.bin", b"1")
    storage.publish("out/claim.json", b"1", if_absent=True)
    storage.compare_and_swap("out/ptr.json", b"1", lambda current: current is None)
    for name in ("plain.bin", "claim.json", "ptr.json"):
        assert stat.S_IMODE(os.stat(os.path.join(storage.base, "out", name)).st_mode) == mode, name


@pytest.mark.parametrize("if_absent", [False, True])
def test_local_publish_fsyncs_the_file_before_it_is_named_and_the_folder_after(local_storage_config,
                                                                                 monkeypatch, if_absent):
    storage = open_storage(local_storage_config, for_writing=True)
    dest = os.path.join(storage.base, "jobs", "j1", "part-00000.parquet")
    synced = []                                       # (what was fsynced, did dest exist, its bytes then)
    real_fsync = os.fsync

    def spy(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            synced.append(("dir", path, os.path.exists(dest)))
        else:
            with open(path, "rb") as f:
                synced.append(("file", path, os.path.exists(dest), f.read()))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    data = os.urandom(50_000)
    assert storage.publish("jobs/j1/part-00000.parquet", data, if_absent=if_absent)
    files = [s for s in synced if s[0] == "file"]
    assert len(files) == 1 and files[0][2] is False and files[0][3] == data      # whole bytes, before the name
    assert ("dir", os.path.dirname(dest), True) in synced                          # the name, after
    assert ("dir", storage.base, False) in synced                                  # the new folders' names
    with open(dest, "rb") as f:
        assert f.read() == data
    assert os.listdir(os.path.dirname(dest)) == ["part-00000.parquet"]             # no temp file left
