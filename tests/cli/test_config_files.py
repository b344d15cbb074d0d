"""--config FILE.toml on every verb: the file's keys are the verb's long flags, flags on the command line win,
`vaegen config show` prints the effective settings as a file --config reads back, and a bad file is refused
with the key named."""
import argparse

import pytest

from jobs.args import train_job_config
from jobs.cli import build_parser
from jobs.cli import main as vaegen
from jobs.config_file import effective_settings, parse_args, with_config_name
from jobs.generate_cmds import run_generate
from jobs.train_cmds import run_train
from vae_core.errors import VaegenError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "vaegen.toml"
    path.write_text(text)
    return str(path)


def parse(argv: list[str]) -> argparse.Namespace:
    return parse_args(build_parser(), argv)


def test_file_values_fill_the_flags_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, 'root = "/data/vaegen"\narch = "conv"\nlatent-dim = 8\nlr = 1\n'
                           'no_progress = true\nconditional = true\n[train]\nepochs = 3\n[generate]\ncount = 99\n')
    args = parse(["train", "--config", path, "--epochs", "7"])
    assert (args.root, args.arch, args.latent_dim, args.epochs) == ("/data/vaegen", "conv", 8, 7)
    assert args.lr == 1.0 and isinstance(args.lr, float)             # an int where a float goes is fine
    assert args.progress is False and args.conditional is True and args.run is run_train
    assert parse(["train", "--config", path]).epochs == 3            # [train] applies to train only


def test_a_preset_fills_only_what_neither_the_file_nor_the_flags_set(tmp_path):
    from jobs.args import train_job_config
    path = write(tmp_path, "epochs = 3\n")
    job = train_job_config(parse(["train", "--config", path, "--preset", "mlp-classic", "--lr", "0.01"]))
    assert (job.train.epochs, job.train.lr, job.train.val_fraction) == (3, 0.01, 0.02)   # file, flag, preset


def test_required_flags_can_come_from_the_file(tmp_path):
    path = write(tmp_path, '[generate]\nmodel = "tiny@v0001"\ncount = 500\nlabels = [1, 2]\nformat = "png"\n')
    args = parse(["generate", f"--config={path}", "--shard-size", "50"])
    assert (args.model, args.count, args.labels, args.format, args.shard_size) == ("tiny@v0001", 500, [1, 2], "png", 50)
    assert args.run is run_generate


@pytest.mark.parametrize("text, message", [
    ("epochs = 3\nlaerning_rate = 0.1\n", "unknown key 'laerning_rate' for `vaegen train`"),
    ('epochs = "3"\n', "'epochs' must be an integer, got '3'"),
    ("lr = true\n", "'lr' must be a number, got True"),
    ("binarize = 1\n", "'binarize' must be true or false, got 1"),
    ('arch = "transformer"\n', "'arch' must be one of mlp, conv, got 'transformer'"),
    ("[trian]\nepochs = 3\n", "[trian] is not a vaegen verb"),
    ("[train]\nepochs = 3\n[train.arch]\nx = 1\n", "'arch' must be a string, got {'x': 1}"),
    ("epochs = \n", "is not valid TOML"),
])
def test_a_bad_file_is_refused_with_the_key_named(tmp_path, capsys, text, message):
    assert vaegen(["train", "--config", write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: config file ") and message in err and err.count("\n") == 1


def test_a_missing_file_is_one_clear_error(tmp_path, capsys):
    assert vaegen(["ls", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err


def test_values_from_the_file_are_checked_like_flags(tmp_path, capsys):
    path = write(tmp_path, f'root = "{tmp_path}/root"\nmodel = "tiny"\ncount = 10\nshard-size = 0\n')
    assert vaegen(["generate", "--config", path]) == 2
    assert "--shard-size=0 must be > 0" in capsys.readouterr().err


def test_config_show_prints_a_file_that_reads_back_the_same(tmp_path, capsys):
    path = write(tmp_path, '[generate]\nmodel = "tiny"\ncount = 500\nlabels = [3]\n')
    assert vaegen(["config", "show", "generate", "--config", path, "--seed", "9"]) == 0
    out = capsys.readouterr().out
    assert 'model = "tiny"' in out and "count = 500" in out and "seed = 9" in out and "labels = [3]" in out
    assert "# address = (unset)" in out and "no-progress = false" in out
    again = write(tmp_path, out)
    assert effective_settings(build_parser(), ["generate", "--config", again]) == effective_settings(
        build_parser(), ["generate", "--config", path, "--seed", "9"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1"], "--lr=-1.0 must be > 0"),
    (["generate", "--model", "tiny", "--count", "10", "--shard-size", "0"], "--shard-size=0 must be > 0"),
    (["reconstruct", "--model", "tiny", "--dataset", "fm", "--decode-batch", "0"], "--decode-batch=0"),
    (["pipeline", "--count", "-3"], "--count=-3 must be > 0"),
    (["ls", "--s3-timeout", "inf"], "--s3-timeout=inf must be a finite number"),
])
def test_config_show_refuses_settings_the_verb_would_refuse(argv, message, capsys):
    assert vaegen(["config", "show", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_config_show_shows_every_verbs_own_defaults_as_valid():
    parser = build_parser()
    for argv in (["train"], ["generate", "--model", "m", "--count", "1"], ["reconstruct", "--model", "m",
                 "--dataset", "d"], ["pipeline"], ["evaluate", "--model", "m"], ["retrain"], ["ls"], ["show", "x"],
                 ["ingest", "fashion-mnist"], ["sample", "--model", "m"]):
        assert effective_settings(parser, argv)[0] == argv[0]


def test_every_verb_takes_config(tmp_path):
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in verbs.items():
        leaves = [sub] if not sub._subparsers else [
            p for a in sub._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
        for leaf in leaves:
            assert "--config" in leaf._option_string_actions or name == "config", name


def test_a_submitted_command_names_its_config_file_not_this_machines_path():
    assert with_config_name(["train", "--config", "/home/me/b.toml", "--epochs", "1"], "b.toml") == [
        "train", "--config", "b.toml", "--epochs", "1"]
    assert with_config_name(["train", "--config=/home/me/b.toml"], "b.toml") == ["train", "--config=b.toml"]
    assert with_config_name(["train", "--", "--config", "x"], "b.toml") == ["train", "--", "--config", "x"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp.mkdir(exist_ok=True) or tmp, "is a directory: give a TOML file"),
    (lambda tmp: (tmp / "b.toml").write_bytes(bytes(range(256))) and tmp / "b.toml", "is not valid TOML: not UTF-8"),
    (lambda tmp: tmp / "missing.toml", "missing.toml does not exist"),
])
def test_a_config_that_is_no_toml_file_is_one_line(tmp_path, capsys, make, message):
    assert vaegen(["generate", "--model", "tiny", "--config", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaegen: error: config file ") and message in err and err.count("\n") == 1


def test_a_name_from_the_file_is_checked_like_a_flag(tmp_path, capsys):
    assert vaegen(["train", "--config", write(tmp_path, 'name = "a\\u0000b"\ndataset = "../up"\n')]) == 2
    assert "--dataset='../up' is not a valid name" in capsys.readouterr().err


def test_workers_in_a_file_is_a_count_or_auto_for_every_verb_that_has_it(tmp_path):
    """`--workers N|auto` fields: a TOML integer or "auto" reads back as the flag would (a count as an int)."""
    for verb, extra in (("generate", 'model = "m"\ncount = 10\n'), ("train", ""), ("pipeline", "")):
        for value, expected in (("3", 3), ('"auto"', "auto")):
            path = write(tmp_path, f"workers = {value}\n{extra}")
            assert parse([verb, "--config", path]).workers == expected, (verb, value)
    args = parse(["train", "--config", write(tmp_path, 'workers = "two"\n')])
    with pytest.raises(VaegenError, match="--workers='two' must be a number or auto"):
        train_job_config(args)
