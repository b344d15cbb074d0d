"""Nothing leaves the root: a key that could escape it is refused by every Storage method (local and S3 alike), a
symbolic link inside a local root is never followed, and a root that is empty, relative, on another host or
escaping is one line."""
import os

import pytest

from cluster.store.storage import Storage, open_storage
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError

BAD_KEYS = ["..", ".", "../escaped", "a/../../escaped", "a/./b", "./a", "a//b", "a/", "/etc/passwd", "a\\b",
            "..\\escaped", "a\x00b", "a/.."]
KEY_METHODS = {   # every Storage method that takes a key, called as a user of Storage would
    "path": lambda s, k: s.path(k),
    "uri_of": lambda s, k: s.uri_of(k),
    "object_key": lambda s, k: s.object_key(k),
    "exists": lambda s, k: s.exists(k),
    "read_bytes": lambda s, k: s.read_bytes(k),
    "list": lambda s, k: s.list(k),
    "list recursive": lambda s, k: s.list(k, recursive=True),
    "list_dirs": lambda s, k: s.list_dirs(k),
    "publish": lambda s, k: s.publish(k, b"x"),
    "publish if_absent": lambda s, k: s.publish(k, b"x", if_absent=True),
    "compare_and_swap": lambda s, k: s.compare_and_swap(k, b"x", lambda current: True),
    "delete": lambda s, k: s.delete(k),
}
WRITES = ("publish", "publish if_absent", "compare_and_swap", "delete", "object_key")


def everything_under(storage: Storage) -> list:
    """The whole bucket (S3) or the whole folder around the root (local): what a refused call must not change."""
    if storage.is_s3:
        listed = storage.s3_client.list_objects_v2(Bucket=storage.bucket)
        return sorted((o["Key"], o["ETag"]) for o in listed.get("Contents", []))
    top = os.path.dirname(storage.base)
    return sorted((os.path.relpath(os.path.join(d, f), top), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(top) for f in files)


@pytest.mark.parametrize("key", BAD_KEYS + [""])
def test_a_key_that_could_leave_the_root_is_refused_by_every_method(storage_config, key):
    storage = open_storage(storage_config, for_writing=True)
    storage.publish("a/b", b"keep")
    before = everything_under(storage)
    for name, call in KEY_METHODS.items():
        if key == "" and name not in WRITES:
            continue                                  # the empty key is the root itself: readable (below)
        with pytest.raises(VaegenError) as refused:
            call(storage, key)
        message = str(refused.value)
        assert "\n" not in message and "refusing storage key" in message, (name, message)
    assert everything_under(storage) == before        # nothing written, nothing deleted
    assert storage.read_bytes("a/b") == b"keep"


def test_the_empty_key_still_means_the_root(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    storage.publish("d/x.bin", b"1")
    assert storage.path("") == storage.path() == storage.base
    assert [e.key for e in storage.list("", recursive=True)] == ["d/x.bin"]
    assert storage.list_dirs("") == ["d"]
    assert not storage.exists("")                     # the root is a folder, not an object
    assert storage.exists("d/x.bin")


# -- a local root is a closed world: no link inside it is followed -------------------------------------------

@pytest.fixture
def linked_root(tmp_path):
    """A root holding `a/link` → a folder outside it, and `a/file` → a file outside it."""
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "f").write_bytes(b"not vaegen's")
    storage = open_storage(StorageConfig(root=str(tmp_path / "root")), for_writing=True)
    storage.publish("a/keep", b"keep")
    os.symlink(outside, storage.base + "/a/link")
    os.symlink(outside / "d" / "f", storage.base + "/a/file")
    return storage, outside


def outside_tree(outside) -> dict:
    return {str(p.relative_to(outside)): p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key", ["a/link/d/f", "a/link/d/new", "a/link/d", "a/link", "a/file"])
def test_no_method_reads_writes_or_deletes_through_a_link_inside_the_root(linked_root, key):
    storage, outside = linked_root
    before = outside_tree(outside)
    for name, call in KEY_METHODS.items():
        if name in ("uri_of", "object_key"):
            continue                                   # names, not file-system calls
        with pytest.raises(VaegenError, match="refusing to follow the symbolic link") as refused:
            call(storage, key)
        assert "\n" not in str(refused.value), name
    assert outside_tree(outside) == before and os.path.islink(storage.base + "/a/link")


def test_a_listing_that_meets_a_link_is_refused_and_deletes_nothing(linked_root):
    storage, outside = linked_root
    for prefix in ("", "a"):
        with pytest.raises(VaegenError, match=r"symbolic link .*/a/(link|file)"):
            storage.list(prefix, recursive=True)
    with pytest.raises(VaegenError, match="symbolic link"):
        storage.list_dirs("a")
    assert outside_tree(outside) == {"d/f": b"not vaegen's"}


def test_the_root_itself_may_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root")
    storage = open_storage(StorageConfig(root=str(tmp_path / "root")), for_writing=True)
    storage.publish("x/y", b"1")
    assert storage.list("", recursive=True)[0].key == "x/y" and (tmp_path / "real" / "x" / "y").read_bytes() == b"1"


@pytest.mark.parametrize("root, fragment", [
    ("", "the storage root is empty"),
    ("  ", "the storage root is empty"),
    ("file://myroot", "names the host 'myroot'"),
    ("file://otherhost/srv/data", "names the host 'otherhost'"),
    ("file://localhost", "not an absolute file URI"),
    ("s3://bucket/a/../b", "refusing storage key"),
    ("s3://bucket/a//b", "refusing storage key"),
    ("s3://bucket/./b", "refusing storage key"),
])
def test_a_root_that_is_empty_relative_elsewhere_or_escaping_is_one_line(root, fragment):
    with pytest.raises(VaegenError, match=fragment) as refused:
        Storage(StorageConfig(root=root))
    assert "\n" not in str(refused.value)


def test_file_uris_follow_rfc_8089(tmp_path):
    assert Storage(StorageConfig(root=f"file://{tmp_path}/r")).base == f"{tmp_path}/r"
    assert Storage(StorageConfig(root=f"file://localhost{tmp_path}/r")).base == f"{tmp_path}/r"
    assert Storage(StorageConfig(root=f"file://{tmp_path}/a%20b")).base == f"{tmp_path}/a b"
