"""The readers (`vaegen ls`, `vaegen show`, the gallery) under corrupt records and hostile targets: a job counts
as finished only when its `_SUCCESS` names the sha256 of its manifest; an unreadable record is one
`vaegen: error:` line naming the file (show) or an entry marked `corrupt` among the rest (ls); a show target
never writes outside its root. Fixtures are written straight through Storage.publish: no Ray, no generation."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from conftest import rng_images

from cluster.data.datasets import ingest
from cluster.show.inventory import list_jobs
from cluster.store.layout import GALLERY, OUTPUT_FORMAT_VERSION, dataset_manifest_key
from cluster.store.registry import CHAMPION_FILE, Registry
from cluster.store.storage import Storage, open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.images import png_bytes

FINISHED = "samples-00000000000000f1"      # a committed job: one PNG-tar shard of 4 images
OTHER = "samples-00000000000000f2"         # a second committed job: must stay listed whatever breaks
PARTIAL = "samples-00000000000000a1"       # 1 of 2 shards done, a run record, no _SUCCESS


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_shard(ids: range) -> bytes:
    """A PNG-tar shard as the writers make it: <id>.png then <id>.json per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, image in zip(ids, rng_images(len(ids), seed=ids[0])):
            for name, data in ((f"{i:010d}.png", png_bytes(image)),
                               (f"{i:010d}.json", json.dumps({"id": i, "label": i % 2}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def receipt(index: int, shard: bytes, first_id: int) -> dict:
    return {"index": index, "name": f"part-{index:05d}.tar", "rows": 4, "first_id": first_id,
            "last_id": first_id + 3, "bytes": len(shard), "sha256": sha256(shard)}


def publish_finished_job(storage: Storage, job_id: str) -> None:
    prefix = f"outputs/{job_id}"
    shard = tar_shard(range(4))
    storage.publish(f"{prefix}/part-00000.tar", shard)
    storage.publish(f"{prefix}/_receipts/part-00000.tar.json", json.dumps(receipt(0, shard, 0)).encode())
    spec = {"kind": "samples", "model": "tiny@v0001", "format": "png", "decode_batch": 64, "count": 4,
            "shard_size": 4, "seed": 0, "labels": []}
    manifest = {"job_id": job_id, "kind": "samples", "format": "png", "model": "tiny@v0001",
                "created_at": time.time(), "output_format_version": OUTPUT_FORMAT_VERSION, "prefix": prefix,
                "label_names": ["even", "odd"], "spec": spec, "totals": {"shards": 1, "rows": 4, "bytes": len(shard)},
                "shards": [receipt(0, shard, 0)]}
    body = json.dumps(manifest, indent=2).encode()
    storage.publish(f"{prefix}/_manifest.json", body)
    storage.publish(f"{prefix}/_SUCCESS", json.dumps({"manifest_sha256": sha256(body)}).encode())


def publish_partial_job(storage: Storage, job_id: str) -> None:
    prefix = f"outputs/{job_id}"
    shard = tar_shard(range(4))
    storage.publish(f"{prefix}/part-00000.tar", shard)
    storage.publish(f"{prefix}/_receipts/part-00000.tar.json", json.dumps(receipt(0, shard, 0)).encode())
    run = {"job_id": job_id, "kind": "samples", "format": "png", "model": "tiny@v0001", "planned_shards": 2,
           "planned_rows": 8, "started_at": time.time(), "status": "running"}
    storage.publish(f"{prefix}/_run.json", json.dumps(run).encode())


def build_root(cfg: StorageConfig) -> Storage:
    """Two datasets, a model with a champion and metrics, two finished jobs and a partial one."""
    storage = open_storage(cfg, for_writing=True)
    for name in ("fm", "fm2"):
        split = ArraySplit(rng_images(4), np.arange(4, dtype=np.int64) % 2)
        ingest(storage, name, ArrayDataset({"train": split}, ("even", "odd"), "test"), shard_rows=4, progress=False)
    for name in ("tiny", "other"):
        Registry(storage).publish(name, {"config.json": json.dumps({"model": {"latent_dim": 2},
                                                                    "train_job": {"dataset": "fm"}}).encode(),
                                         "model.safetensors": b"weights",
                                         "metrics.json": json.dumps({"test_loss": 251.5,
                                                                     "evaluation": {"nll": 249.0}}).encode()})
        storage.publish(Registry(storage).key(name, CHAMPION_FILE), json.dumps({"version": "v0001"}).encode())
    publish_finished_job(storage, FINISHED)
    publish_finished_job(storage, OTHER)
    publish_partial_job(storage, PARTIAL)
    return storage


@pytest.fixture
def root(tmp_path) -> tuple[StorageConfig, Storage]:
    cfg = StorageConfig(root=str(tmp_path / "root"))
    return cfg, build_root(cfg)


def truncate(storage: Storage, key: str) -> None:
    body = storage.read_bytes(key)
    storage.publish(key, body[: len(body) // 2])


def replace_json(storage: Storage, key: str, value) -> None:
    storage.publish(key, json.dumps(value).encode())


def commit_as_is(storage: Storage, job_id: str) -> None:
    """Make _SUCCESS name the manifest as it now is (a committed record whose content is wrong)."""
    body = storage.read_bytes(f"outputs/{job_id}/_manifest.json")
    replace_json(storage, f"outputs/{job_id}/_SUCCESS", {"manifest_sha256": sha256(body)})


def tree(top) -> dict[str, str]:
    """Every file under `top` (relative path → sha256 of its bytes) and every folder."""
    found = {}
    for folder, dirs, files in os.walk(top):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), top) + "/"] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            found[os.path.relpath(path, top)] = sha256(open(path, "rb").read())
    return found


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaegen: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def ls_lines(cfg: StorageConfig, capsys) -> dict[str, str]:
    assert vaegen(["ls", cfg.root]) == 0
    out = capsys.readouterr().out
    rows = [(line.split(), line) for line in out.splitlines() if line.split()]
    return {words[1] if words[0] == "*" else words[0]: line for words, line in rows}     # "*": the champion


# -- corrupt records: ls lists the rest and marks the entry; show is one line naming the file ----------------
JOB = f"outputs/{FINISHED}"
# (case, corrupt(storage), ls entry marked corrupt or None, show target or None, file the show error names)
CORRUPTIONS = [
    ("manifest truncated", lambda s: truncate(s, f"{JOB}/_manifest.json"), FINISHED, FINISHED, "manifest.json"),
    ("manifest not an object, committed", lambda s: (replace_json(s, f"{JOB}/_manifest.json", [1, 2]),
                                                     commit_as_is(s, FINISHED)), FINISHED, FINISHED, "manifest.json"),
    ("manifest lacks totals, committed", lambda s: (replace_json(s, f"{JOB}/_manifest.json", {"kind": "samples"}),
                                                    commit_as_is(s, FINISHED)), FINISHED, FINISHED, "manifest.json"),
    ("_SUCCESS truncated", lambda s: truncate(s, f"{JOB}/_SUCCESS"), FINISHED, FINISHED, "_SUCCESS"),
    ("_SUCCESS without the sha", lambda s: replace_json(s, f"{JOB}/_SUCCESS", {"ok": True}), FINISHED, FINISHED,
     "_SUCCESS"),
    ("_SUCCESS names another manifest", lambda s: replace_json(s, f"{JOB}/_SUCCESS", {"manifest_sha256": "ab" * 32}),
     FINISHED, FINISHED, "_SUCCESS"),
    ("run record truncated", lambda s: truncate(s, f"outputs/{PARTIAL}/_run.json"), PARTIAL, PARTIAL, "_run.json"),
    ("run record a list", lambda s: replace_json(s, f"outputs/{PARTIAL}/_run.json", ["running"]), PARTIAL, PARTIAL,
     "_run.json"),
    ("receipt truncated", lambda s: truncate(s, f"outputs/{PARTIAL}/_receipts/part-00000.tar.json"), None, PARTIAL,
     "part-00000.tar.json"),
    ("receipt without rows", lambda s: replace_json(s, f"outputs/{PARTIAL}/_receipts/part-00000.tar.json",
                                                    {"index": 0, "name": "part-00000.tar"}), None, PARTIAL,
     "part-00000.tar.json"),
    ("shard truncated", lambda s: truncate(s, f"{JOB}/part-00000.tar"), None, FINISHED, "part-00000.tar"),
    ("dataset manifest truncated", lambda s: truncate(s, dataset_manifest_key("fm")), "fm", None, ""),
    ("dataset manifest without splits", lambda s: replace_json(s, dataset_manifest_key("fm"),
                                                               {"name": "fm"}), "fm", None, ""),
    ("champion truncated", lambda s: truncate(s, f"models/tiny/{CHAMPION_FILE}"), "tiny@v0001", "tiny",
     CHAMPION_FILE),
    ("champion a list", lambda s: replace_json(s, f"models/tiny/{CHAMPION_FILE}", ["v0001"]), "tiny@v0001", "tiny",
     CHAMPION_FILE),
    ("metrics truncated", lambda s: truncate(s, "models/tiny/v0001/metrics.json"), "tiny@v0001", "tiny@v0001",
     "metrics.json"),
]


@pytest.mark.parametrize("case, corrupt, marked, target, named", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupt_record_is_one_line_in_show_and_one_marked_entry_in_ls(root, capsys, case, corrupt, marked,
                                                                         target, named):
    cfg, storage = root
    corrupt(storage)
    lines = ls_lines(cfg, capsys)
    for entry in ("fm", "fm2", "tiny@v0001", "other@v0001", FINISHED, OTHER, PARTIAL):
        assert entry in lines, (entry, lines)                  # one bad entry never hides the rest
    assert "finished" in lines[OTHER] and "fm2" in lines and "1x28x28" in lines["fm2"]
    if marked:
        assert "corrupt" in lines[marked], lines[marked]

    if target:
        before = tree(cfg.root)
        assert vaegen(["show", target, "--root", cfg.root]) == 2
        line = one_error_line(capsys)
        assert named in line and cfg.root in line, line
        assert tree(cfg.root) == before                        # nothing published for a refused show


def test_a_job_whose_success_names_another_manifest_is_not_finished(root, capsys):
    """Two drivers' interleaved commits: _manifest.json rewritten after _SUCCESS was written for the other one."""
    cfg, storage = root
    manifest = json.loads(storage.read_bytes(f"{JOB}/_manifest.json"))
    manifest["created_at"] += 1                                  # another run's (equally valid) manifest
    storage.publish(f"{JOB}/_manifest.json", json.dumps(manifest).encode())

    states = {j.job_id: j.state for j in list_jobs(storage)}
    assert states[FINISHED] == "corrupt" and states[OTHER] == "finished"
    assert "corrupt" in ls_lines(cfg, capsys)[FINISHED]
    assert vaegen(["show", FINISHED, "--root", cfg.root]) == 2
    line = one_error_line(capsys)
    assert "_SUCCESS" in line and "rerun the same generate command" in line

    commit_as_is(storage, FINISHED)                               # the commit that names it: finished again
    assert {j.job_id: j.state for j in list_jobs(storage)}[FINISHED] == "finished"


def test_a_job_of_another_output_format_is_refused_in_one_line_that_says_how_to_remake_it(root, capsys):
    cfg, storage = root
    manifest = json.loads(storage.read_bytes(f"{JOB}/_manifest.json"))
    replace_json(storage, f"{JOB}/_manifest.json", {**manifest, "output_format_version": OUTPUT_FORMAT_VERSION - 1})
    commit_as_is(storage, FINISHED)
    assert "corrupt" in ls_lines(cfg, capsys)[FINISHED]
    assert vaegen(["show", FINISHED, "--root", cfg.root]) == 2
    assert one_error_line(capsys).endswith(f"_manifest.json is in another format (output format "
                                           f"{OUTPUT_FORMAT_VERSION - 1}; this vaegen reads {OUTPUT_FORMAT_VERSION}): "
                                           "the same generate command makes the job anew, under a new id")


def test_a_sound_root_lists_and_shows_as_before(root, capsys):
    cfg, _ = root
    lines = ls_lines(cfg, capsys)
    assert "finished" in lines[FINISHED] and "1/1" in lines[FINISHED] and "partial" in lines[PARTIAL]
    assert lines["tiny@v0001"].startswith("*") and "251.50" in lines["tiny@v0001"] and "corrupt" not in str(lines)
    assert vaegen(["show", FINISHED, "--root", cfg.root]) == 0
    assert "4 images in 1 of 1 shards" in capsys.readouterr().out
    page = open(os.path.join(cfg.root, JOB, GALLERY)).read()
    assert 'id="rows" data-count="4"' in page and "<h3>1: odd</h3>" in page


def test_show_takes_job_and_model_paths_even_under_a_folder_named_outputs(tmp_path, capsys, monkeypatch):
    for display in ("DISPLAY", "WAYLAND_DISPLAY"):                  # --open prints the path, opens no browser
        monkeypatch.delenv(display, raising=False)
    cfg = StorageConfig(root=str(tmp_path / "outputs" / "root"))      # the root's own path has an outputs/ in it
    build_root(cfg)
    assert vaegen(["show", os.path.join(cfg.root, "models", "tiny", "v0001"), "--open"]) == 0
    page = capsys.readouterr().out.strip()
    assert page == os.path.join(cfg.root, "models", "tiny", "v0001", GALLERY)
    assert "<title>vaegen model tiny@v0001</title>" in open(page).read()        # a model page, not a "job"
    assert vaegen(["show", os.path.join(cfg.root, JOB) + "/", "--open"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(cfg.root, JOB, GALLERY)
    assert vaegen(["show", "tiny@v0001", "--root", cfg.root, "--open"]) == 0


# -- targets and flags that must be refused, leaving everything outside the root (and the root) unchanged ----
def hostile_shows(root: str, elsewhere: str) -> list[list[str]]:
    return [
        ["show", f"{root}/outputs/../../{os.path.basename(elsewhere)}"],
        ["show", f"{root}/outputs/{FINISHED}/../../../{os.path.basename(elsewhere)}"],
        ["show", f"{root}/outputs/.."],
        ["show", f"{root}/models/.."],
        ["show", "..", "--root", root],
        ["show", f"{root}/models/tiny/.."],
        ["show", FINISHED, "--root", root, "--per-class", "0"],
        ["show", FINISHED, "--root", root, "--out", f"{elsewhere}/missing/dir/gallery.html"],
        ["show", FINISHED, "--root", root, "--out", elsewhere],
        ["show", "samples-0123456789abcdef", "--root", root],
    ]


@pytest.mark.parametrize("case", range(10))
def test_a_hostile_show_is_refused_and_writes_nothing_anywhere(tmp_path, capsys, case):
    cfg = StorageConfig(root=str(tmp_path / "root"))
    build_root(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")           # a folder with content: the old code wrote here
    argv = hostile_shows(cfg.root, str(elsewhere))[case]
    before = tree(tmp_path)
    assert vaegen(argv) == 2, argv
    one_error_line(capsys)
    assert tree(tmp_path) == before, argv


def test_show_of_a_missing_job_id_says_the_job_does_not_exist(root, capsys):
    cfg, _ = root
    assert vaegen(["show", "samples-0123456789abcdef", "--root", cfg.root]) == 2
    line = one_error_line(capsys)
    assert "no job 'samples-0123456789abcdef'" in line and "does not exist" in line and "model" not in line


def test_show_out_to_a_missing_folder_is_one_line_and_creates_nothing(root, tmp_path, capsys):
    cfg, _ = root
    out = tmp_path / "missing" / "dir" / "x.html"
    assert vaegen(["show", FINISHED, "--root", cfg.root, "--out", str(out)]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "missing").exists()
    good = tmp_path / "gallery-copy.html"
    assert vaegen(["show", FINISHED, "--root", cfg.root, "--out", str(good), "--open"]) == 0
    assert capsys.readouterr().out.strip() == str(good) and 'data-count="4"' in good.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # no temp file left


# -- the root itself -----------------------------------------------------------------------------------------
def test_ls_of_a_missing_root_exits_2_and_an_empty_root_lists_nothing(tmp_path, capsys):
    assert vaegen(["ls", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "afile").write_text("x")
    assert vaegen(["ls", str(tmp_path / "afile")]) == 2
    assert "not a folder" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert vaegen(["ls", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "datasets: none" in out and "models (* = champion): none" in out and "jobs: none" in out


def test_ls_of_a_missing_root_from_the_console_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "ls", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("vaegen: error:") and "Traceback" not in proc.stderr


def test_ls_on_s3_marks_a_corrupt_job_and_lists_the_rest(s3_storage_config, capsys):
    storage = build_root(s3_storage_config)
    truncate(storage, f"{JOB}/_manifest.json")
    flags = ["--s3-endpoint", s3_storage_config.s3_endpoint]
    assert vaegen(["ls", s3_storage_config.root, *flags]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.split()}
    assert "corrupt" in lines[FINISHED] and "finished" in lines[OTHER] and "fm" in lines
    assert vaegen(["show", storage.uri_of(JOB), *flags]) == 2
    assert "manifest.json is corrupt (not valid JSON" in one_error_line(capsys)


class WithdrawsSuccessOnFirstRead(Storage):
    """A real local root where another driver withdraws `_SUCCESS` (to repair the job) just after a reader saw
    it exist and before the reader's GET: the moment a repair starts."""

    def read_bytes(self, key: str) -> bytes:
        if key.endswith("/_SUCCESS") and not getattr(self, "withdrawn", False):
            self.withdrawn = True
            self.delete(key)
        return super().read_bytes(key)


def test_ls_reads_a_job_again_when_its_success_is_withdrawn_mid_read(root):
    cfg, _ = root
    racing = WithdrawsSuccessOnFirstRead(cfg)
    states = {j.job_id: j.state for j in list_jobs(racing)}
    assert racing.withdrawn and states[FINISHED] == "partial" and states[OTHER] == "finished"


# -- every field of every record, mutated: never an internal error --------------------------------------------
REMOVED = object()
MUTANTS = {"string": "many", "null": None, "removed": REMOVED, "huge": 1e308, "2**63": 2 ** 63, "list": [None],
           "object": {}, "bool": True}
# (record key, path of the field inside it, the entry ls marks, the target show reads, commit the manifest after,
#  the mutants that are still a record vaegen writes: any string where a string belongs, an optional field removed)
FIELDS = [
    (dataset_manifest_key("fm"), ("splits", "train", "rows"), "fm", None, False, ()),
    (dataset_manifest_key("fm"), ("splits", "train", "shards"), "fm", None, False, ()),
    (dataset_manifest_key("fm"), ("image_shape",), "fm", None, False, ()),
    (dataset_manifest_key("fm"), ("label_names",), "fm", None, False, ()),
    (f"{JOB}/_manifest.json", ("shards",), FINISHED, FINISHED, True, ()),
    (f"{JOB}/_manifest.json", ("totals", "rows"), FINISHED, FINISHED, True, ()),
    (f"{JOB}/_manifest.json", ("totals", "shards"), FINISHED, FINISHED, True, ()),
    (f"{JOB}/_manifest.json", ("kind",), FINISHED, FINISHED, True, ("string",)),
    (f"{JOB}/_manifest.json", ("created_at",), FINISHED, FINISHED, True, ()),
    (f"outputs/{PARTIAL}/_receipts/part-00000.tar.json", ("rows",), None, PARTIAL, False, ()),   # ls reads no receipt
    (f"outputs/{PARTIAL}/_receipts/part-00000.tar.json", ("index",), None, PARTIAL, False, ()),
    (f"outputs/{PARTIAL}/_run.json", ("planned_shards",), PARTIAL, PARTIAL, False, ()),
    (f"outputs/{PARTIAL}/_run.json", ("started_at",), PARTIAL, PARTIAL, False, ()),
    (f"outputs/{PARTIAL}/_run.json", ("status",), PARTIAL, PARTIAL, False, ("string",)),
    (f"outputs/{PARTIAL}/_run.json", ("model",), PARTIAL, PARTIAL, False, ("string",)),
    ("models/tiny/v0001/metrics.json", ("test_loss",), "tiny@v0001", "tiny@v0001", False, ("removed",)),
    ("models/tiny/v0001/metrics.json", ("evaluation", "nll"), "tiny@v0001", "tiny@v0001", False, ("removed",)),
    ("models/tiny/v0001/config.json", ("model",), "tiny@v0001", "tiny@v0001", False, ("object",)),
    ("models/tiny/v0001/config.json", ("train_job", "dataset"), "tiny@v0001", "tiny@v0001", False,
     ("string", "removed")),
    ("models/tiny/v0001/config.json", ("model", "latent_dim"), "tiny@v0001", "tiny@v0001", False, ("removed",)),
    (f"models/tiny/{CHAMPION_FILE}", ("version",), "tiny@v0001", "tiny", False, ()),
]


def mutate(record: dict, path: tuple[str, ...], value) -> dict:
    inner = record
    for step in path[:-1]:
        inner = inner[step]
    if value is REMOVED:
        del inner[path[-1]]
    else:
        inner[path[-1]] = value
    return record


@pytest.mark.parametrize("key, path, marked, target, commit, valid", FIELDS, ids=["/".join(f[1]) for f in FIELDS])
def test_a_record_with_any_field_mutated_is_marked_or_refused_never_an_internal_error(root, capsys, key, path,
                                                                                        marked, target, commit, valid):
    cfg, storage = root
    original = storage.read_bytes(key)
    for name, value in MUTANTS.items():
        storage.publish(key, json.dumps(mutate(json.loads(original), path, value)).encode())
        if commit:
            commit_as_is(storage, FINISHED)
        assert vaegen(["ls", cfg.root]) == 0, name
        captured = capsys.readouterr()
        assert "internal error" not in captured.err + captured.out, (name, captured.err)
        rows = {words[1] if words[0] == "*" else words[0]: line                # "*": the champion
                for line in captured.out.splitlines() if (words := line.split())}
        assert OTHER in rows and "fm2" in rows and "other@v0001" in rows, name     # the rest is still listed
        corrupt = name not in valid
        if marked:
            assert ("corrupt" in rows[marked]) == corrupt, (name, rows[marked])
        if target:
            code = vaegen(["show", target, "--root", cfg.root])
            captured = capsys.readouterr()
            assert "internal error" not in captured.err, (name, captured.err)
            lines = captured.err.strip().splitlines()
            if corrupt:
                assert code == 2 and len(lines) == 1 and key.rsplit("/", 1)[1] in lines[0], (name, captured.err)
            else:
                assert code == 0 or (code == 2 and len(lines) == 1), (name, captured.err)
