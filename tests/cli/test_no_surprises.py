"""Small surprises a new user met, each gone: an s3:// --out for `sample`, `show --open` on an S3 job, a relative
--root sent to the cluster, a verb that creates ./vaegen-data before failing, and "1 shards"."""
from __future__ import annotations

import uuid

import pytest

from cluster.store.storage import open_storage
from jobs.cli import main
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sample_writes_an_s3_out_to_the_bucket(tiny_root, s3_server, capsys):
    prefix = uuid.uuid4().hex[:12]
    out = f"s3://vaegen-test/{prefix}/grids/grid.png"
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--count", "4", "--out", out,
                 "--s3-endpoint", s3_server]) == 0
    bucket = open_storage(StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=s3_server))
    assert bucket.read_bytes("grids/grid.png")[:8] == PNG_MAGIC
    assert f"wrote 4 samples of tiny@v0001 to {out}" in capsys.readouterr().out
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--out", "s3://missing-bucket/grid.png",
                 "--s3-endpoint", s3_server]) == 2                    # refused before the model loads, in one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bucket 'missing-bucket' does not exist" in err, err


def test_show_open_on_an_s3_root_is_refused_before_anything_is_written(s3_storage_config, capsys):
    bucket = open_storage(s3_storage_config)
    assert main(["show", "tiny", "--open", "--root", s3_storage_config.root,
                 "--s3-endpoint", s3_storage_config.s3_endpoint]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: --open") and "--out FILE" in err and err.count("\n") == 1
    assert bucket.list("", recursive=True) == []


def test_submit_refuses_a_relative_root_in_one_line():
    from jobs.ops_cmds import check_command
    with pytest.raises(VaegenError, match=r"--root=./here is relative to this machine's folder.*s3://"):
        check_command(["--", "generate", "--model", "m@v0001", "--count", "5", "--root", "./here"])
    with pytest.raises(VaegenError, match="unknown flag --modle"):
        check_command(["--", "generate", "--modle", "x"])


@pytest.mark.parametrize("argv", [["generate", "--model", "m", "--count", "5"], ["train"],
                                  ["evaluate", "--model", "m"], ["retrain"]])
def test_a_verb_refused_for_missing_inputs_creates_no_root(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("vaegen: error: no ")
    assert list(tmp_path.iterdir()) == []                              # no ./vaegen-data, no logs


def test_counts_of_one_are_singular(capsys):
    from jobs.generate_cmds import report
    report({"kind": "samples", "job_id": "j", "model": "m@v0001", "format": "parquet", "uri": "/r/outputs/j",
            "totals": {"rows": 1, "shards": 1}, "run": {"shards_written": 1, "shards_skipped": 0}})
    assert "1 image in 1 parquet shard at" in capsys.readouterr().out
