"""The `vaegen` command as a user runs it: help on every verb, the main path, one-line errors, exit codes."""
import argparse
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from jobs.cli import build_parser
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.models import build_model


def vaegen(*args, env=None, check=False):
    """Run the CLI in a fresh interpreter, as the console script does."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaegen: error:"), proc.stderr
    assert fragment in lines[0], lines[0]


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command the parser accepts, as the words that name it: ('train',), ('jobs',), ('jobs', 'list'), ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name), *commands(sub, (*path, name))]
    return found


def parser_of(words: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


COMMANDS = commands(build_parser())


def test_the_command_list_comes_from_the_real_parser():
    names = {" ".join(c) for c in COMMANDS}
    assert {"ingest", "train", "sample", "generate", "reconstruct", "evaluate", "pipeline", "retrain", "submit",
            "jobs", "jobs list", "jobs status", "jobs logs", "jobs stop", "ls", "show", "config",
            "config show"} <= names


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_verb_and_action_has_help(words, capsys):
    """`vaegen <verb> [action] --help` prints its usage and exits 0, and every flag and argument there says what it
    is for."""
    from jobs.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: vaegen {' '.join(words)} ")
    (listing,) = [a for a in parser_of(words[:-1])._actions if isinstance(a, argparse._SubParsersAction)]
    (line,) = [c for c in listing._choices_actions if c.dest == words[-1]]
    assert line.help, f"vaegen {' '.join(words[:-1])} --help lists {words[-1]} without a line saying what it does"
    for action in parser_of(words)._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue                                  # its actions are commands of their own, checked as such
        assert action.help, f"vaegen {' '.join(words)}: {action.option_strings or action.dest} has no help"
        for flag in action.option_strings if action.help != argparse.SUPPRESS else ():  # a renamed flag is hidden
            assert flag in out


def test_the_console_script_lists_every_verb():
    out = vaegen("--help", check=True).stdout
    assert out.startswith("usage: vaegen")
    for words in COMMANDS:
        if len(words) == 1:
            assert f"    {words[0]} " in out or f"    {words[0]}\n" in out, words


@pytest.fixture(scope="module")
def ingested_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli") / "root")
    vaegen("ingest", "fashion-mnist", "--root", root, "--no-progress", check=True)
    return root


@pytest.mark.slow         # ingests all 70,000 images, then trains
def test_train_then_sample(ingested_root, tmp_path):
    out = vaegen("train", "--root", ingested_root, "--epochs", "1", "--max-images", "2000", "--hidden-dim", "64",
                 "--name", "tiny", "--no-progress", check=True).stdout
    assert "published tiny@v0001" in out
    version = os.path.join(ingested_root, "models", "tiny", "v0001")
    assert {"model.safetensors", "config.json", "metrics.json", "samples.png", "recon.png",
            "curves.png"} <= set(os.listdir(version))
    metrics = json.load(open(os.path.join(version, "metrics.json")))
    assert metrics["train_images"] == 1800 and metrics["test_images"] == 10000 and len(metrics["history"]) == 1
    png = tmp_path / "grid.png"
    vaegen("sample", "--root", ingested_root, "--model", "tiny", "--count", "16", "--out", str(png), check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, fragment", [
    (["train", "--epochs", "0"], "--epochs=0 must be > 0"),
    (["train", "--batch-size", "-1"], "--batch-size=-1 must be > 0"),
    (["train", "--dataset", "nope"], "no dataset 'nope'"),
    (["sample", "--model", "ghost"], "no model named 'ghost'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_root, capsys, args, fragment):
    from jobs.cli import main
    assert main([*args, "--root", str(tiny_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: ") and err.count("\n") == 1 and fragment in err, err


def test_bad_roots_are_one_line_errors(tmp_path, s3_server):
    assert_one_line_error(vaegen("ingest", "fashion-mnist", "--root", "gs://b/x"), "unsupported storage URI scheme")
    assert_one_line_error(vaegen("ingest", "fashion-mnist", "--root", "s3://missing-bucket/x",
                                 "--s3-endpoint", s3_server), "bucket 'missing-bucket' does not exist")
    assert_one_line_error(vaegen("ingest", "fashion-mnist", str(tmp_path / "none"), "--root", str(tmp_path / "r")),
                          "does not exist")
    assert not (tmp_path / "r" / "datasets").exists()


def test_corrupt_idx_publishes_nothing(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (src / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)       # header cut short
    root = tmp_path / "root"
    assert_one_line_error(vaegen("ingest", "fashion-mnist", str(src), "--root", str(root)), "truncated")
    assert not (root / "datasets").exists()


# -- issue 17: names, limits and failures, checked where they enter (in-process: no interpreter start) ------------
@pytest.mark.parametrize("args, fragment", [
    (["train", "--name", ".."], "--name='..' is not a valid name"),
    (["train", "--name", "a/b"], "--name='a/b' is not a valid name"),
    (["train", "--dataset", "../../x"], "--dataset='../../x' is not a valid name"),
    (["train", "--workers", "1", "--run-id", "../r"], "--run-id='../r' is not a valid name"),
    (["train", "--workers", "100000"], "--workers=100000 must be <= 1024"),
    (["generate", "--model", "../x", "--count", "1"], "--model='../x': model name '../x' is not a valid name"),
    (["generate", "--model", "tiny@../../x", "--count", "1"], "version '../../x' must be v0001, a number"),
    (["generate", "--model", "tiny", "--count", "1000000000", "--shard-size", "1"], "at most 100,000"),
    (["generate", "--model", "tiny", "--count", "10", "--workers", "5000"], "--workers=5000 must be between 1"),
    (["reconstruct", "--model", "tiny", "--dataset", "fm", "--split", ".."], "--split='..' is not a valid name"),
    (["reconstruct", "--model", "tiny", "--dataset", "."], "--dataset='.' is not a valid name"),
    (["evaluate", "--model", "tiny@x"], "version 'x' must be"),
    (["evaluate", "--model", "tiny", "--split", "../test"], "--split='../test' is not a valid name"),
    (["sample", "--model", "a/b"], "model name 'a/b' is not a valid name"),
    (["sample", "--model", "tiny", "--count", "100000000"], "--count=100000000 must be between 1 and 10,000"),
    (["generate", "--model", "tiny", "--count", "many"], "argument --count: invalid int value: 'many'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_names_and_limits_are_refused_where_they_enter(tmp_path, capsys, args, fragment):
    from jobs.cli import main
    root = tmp_path / "root"
    assert main([*args, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: ") and err.count("\n") == 1 and fragment in err, err
    assert not root.exists()                         # refused before the root was touched


def test_the_model_spec_rule():
    from vae_core.errors import VaegenError
    from vae_core.names import check_model_spec
    for good in ("tiny", "tiny@v0001", "tiny@12", "tiny@latest", "tiny@champion", "a.b_c-d@v123456"):
        assert check_model_spec(good) == good
    for bad in ("", "@v0001", "tiny@", "tiny@v1", "tiny@²", "tiny@1@2", "../x", "x/y@v0001", ".@latest",
                "tiny@" + "9" * 5000):
        with pytest.raises(VaegenError, match="--model"):
            check_model_spec(bad)


def test_sample_out_is_replaced_in_one_step_or_not_at_all(tiny_root, tmp_path, monkeypatch, capsys):
    import vae_core.artifacts
    from jobs.cli import main
    out = tmp_path / "grid.png"
    out.write_bytes(b"an earlier grid")
    out.chmod(0o640)

    def broken_encoder(*_, **__):
        raise MemoryError("no room for the PNG")
    with monkeypatch.context() as patch:
        patch.setattr(vae_core.artifacts, "grid_png", broken_encoder)
        with contextlib.suppress(MemoryError):
            main(["sample", "--root", str(tiny_root), "--model", "tiny", "--out", str(out)])
    assert out.read_bytes() == b"an earlier grid"               # not truncated before the samples existed
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "root"]  # and no temp file left behind

    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--count", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_mode & 0o777 == 0o640  # keeps its mode
    old_umask = os.umask(0o022)
    try:
        assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--out", str(tmp_path / "new.png")]) == 0
    finally:
        os.umask(old_umask)
    assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644    # what open() would give, not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "new.png", "root"]
    capsys.readouterr()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sample_lays_out_its_grid_as_torchvision_does(tiny_root, tmp_path, capsys):
    """`sample --count 10` is 8 a row (make_grid's nrow), the bytes of save_image with white borders."""
    import io

    import torch
    from torchvision.utils import save_image

    from jobs.cli import main
    from vae_core.artifacts import PAD_VALUE
    out = tmp_path / "grid.png"
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--count", "10", "--out", str(out)]) == 0
    model = Registry(open_storage(StorageConfig(root=str(tiny_root)))).load("tiny").model
    with torch.no_grad():
        images = model.generate(model.sample_prior(10, None, torch.Generator().manual_seed(0)), None)
    theirs = io.BytesIO()
    save_image(images, theirs, format="png", pad_value=PAD_VALUE)
    assert out.read_bytes() == theirs.getvalue()
    from PIL import Image
    assert Image.open(out).size == (8 * (8 + 2) + 2, 2 * (8 + 2) + 2)       # 8 columns of 8-pixel tiles, 2 rows
    capsys.readouterr()


def test_sample_out_to_a_fifo_streams_into_it(tiny_root, tmp_path, capsys):
    from jobs.cli import main
    fifo = tmp_path / "grid.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--count", "4", "--out", str(fifo)]) == 0
    reader.join(timeout=20)
    assert received and received[0][:8] == PNG_MAGIC
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)                      # still the FIFO, not a file renamed over it
    assert sorted(os.listdir(tmp_path)) == ["grid.fifo", "root"]
    capsys.readouterr()


def test_sample_out_to_a_symlink_replaces_its_target_and_keeps_the_link(tiny_root, tmp_path, capsys):
    from jobs.cli import main
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "grid.png"
    target.write_bytes(b"an earlier grid")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--count", "4", "--out", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(tmp_path / "real") == ["grid.png"]               # the temp file was renamed beside the target
    capsys.readouterr()


@pytest.mark.slow                          # vaegen processes that load torch and decode
def test_sample_out_to_a_character_device_and_to_stdout(tiny_root, tmp_path):
    # Through a link of the test's own: a vaegen that renamed over its --out replaces the link, never /dev/null.
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    assert vaegen("sample", "--root", str(tiny_root), "--model", "tiny", "--out", str(link), check=True)
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)   # written through to the device
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "sample", "--root", str(tiny_root), "--model", "tiny",
                           "--count", "4", "--out", "-"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:8] == PNG_MAGIC and b"wrote 4 samples" in proc.stderr   # the report stays off the image


@pytest.mark.slow                          # vaegen processes, each a cold start
def test_show_out_to_stdout_and_to_a_fifo(tiny_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "show", "tiny", "--root", str(tiny_root), "--out", "-"],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().lower().startswith(b"<!doctype html") and b"written to stdout" in proc.stderr
    fifo = tmp_path / "page.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert vaegen("show", "tiny", "--root", str(tiny_root), "--out", str(fifo), check=True)
    reader.join(timeout=20)
    assert received and b"</html>" in received[0] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_out_that_is_a_socket_is_one_line(tiny_root, tmp_path, capsys):
    from jobs.cli import main
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.sock"))
        for verb in (["sample", "--model", "tiny"], ["show", "tiny"]):
            assert main([*verb, "--root", str(tiny_root), "--out", str(tmp_path / "s.sock")]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "neither a regular file nor a FIFO" in err, err


@pytest.mark.parametrize("out, fragment", [("missing/x.png", "does not exist"), (".", "is a directory")])
def test_sample_out_that_cannot_be_written_is_one_line(tiny_root, tmp_path, capsys, out, fragment):
    from jobs.cli import main
    before = sorted(os.listdir(tmp_path))
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: --out=") and fragment in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before


def test_a_config_weights_mismatch_is_summed_up_on_one_line(tiny_root, capsys):
    from jobs.cli import main
    from vae_core.checkpoint import sha256_hex
    version = tiny_root / "models" / "tiny" / "v0001"
    other = checkpoint_files(build_model(ModelConfig(image_shape=(1, 8, 8), hidden_dim=6, latent_dim=2,
                                                     num_classes=3)))
    (version / "model.safetensors").write_bytes(other["model.safetensors"])
    config = json.loads((version / "config.json").read_text())
    config["weights_sha256"] = sha256_hex(other["model.safetensors"])
    (version / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--root", str(tiny_root), "--model", "tiny", "--out", str(tiny_root / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny@v0001: checkpoint weights do not fit" in err
    assert "shape mismatch: dec_hidden.bias 6 in the file vs 4 in the config" in err
    assert "(+" in err and "dec_hidden.weight 6x5 in the file vs 4x2" in err


@pytest.mark.parametrize("error, code, start", [
    (PermissionError(13, "Permission denied", "/srv/vaegen"), 2, "vaegen: error: Permission denied: '/srv/vaegen'"),
    (KeyError("champion"), 1, "vaegen: internal error: KeyError: 'champion' (a bug in vaegen; rerun with "
                              "VAEGEN_DEBUG=1"),
])
def test_unexpected_exceptions_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys, error,
                                                                          code, start):
    import cluster.show.inventory
    from jobs.cli import main

    def failing(*_):
        raise error
    monkeypatch.setattr(cluster.show.inventory, "list_datasets", failing)
    (tmp_path / "root").mkdir()
    assert main(["ls", str(tmp_path / "root")]) == code
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1, err
    monkeypatch.setenv("VAEGEN_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["ls", str(tmp_path / "root")])


@pytest.mark.parametrize("argv", [["ls", "--root", "{tmp}"], ["config", "show", "train"]], ids=["ls", "config-show"])
def test_a_closed_stdout_ends_quietly_with_the_commands_status(tmp_path, argv):
    """`vaegen ls | true`: the reader is gone before vaegen prints; exit 0, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *(a.format(tmp=tmp_path) for a in argv)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_a_mistyped_flag_is_named_even_when_a_required_one_is_missing(capsys):
    from jobs.cli import main
    assert main(["generate", "--modle", "tiny", "--count", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vaegen: error: unknown flag --modle; the following arguments are "
                                               "required: --model"), err
    assert main(["generate", "--mod", "tiny", "--count", "0"]) == 2          # an abbreviation is no typo
    assert "unknown flag" not in capsys.readouterr().err


def test_an_error_line_carries_no_terminal_colour_codes():
    from jobs.cli import one_line
    coloured = "\x1b[36mray::DecoderWorker.run_shard()\x1b[39m\n  File \"x.py\", line 1\n\x1b[31mOSError\x1b[0m: boom"
    assert one_line(coloured) == 'ray::DecoderWorker.run_shard(); File "x.py", line 1; OSError: boom'


def test_a_corrupt_record_crosses_a_process_boundary_whole():
    import pickle

    from cluster.store.records import CorruptRecord
    error = CorruptRecord("/root/models/m/v0001/config.json", "is corrupt (empty)", "publish it again")
    copy = pickle.loads(pickle.dumps(error))                 # how Ray hands a worker's error to the driver
    assert (str(copy), copy.uri, copy.problem, copy.fix) == (str(error), error.uri, error.problem, error.fix)
