"""The command line has one source of truth per flag: each flag is declared beside its config field, parsed into
that field by one generic builder, presets are typed recipes layered under explicit settings, and `vaegen config
show` prints settings that rebuild exactly the same config. No training and no Ray: only parsing."""
import argparse
import ast
import dataclasses
import pathlib
import re

import pytest
from conftest import vaegen_in_a_fresh_process

from cluster.generate.settings import RunSettings
from jobs.args import storage_config, train_job_config
from jobs.cli import build_parser
from jobs.cli import main as vaegen
from jobs.config_file import parse_args
from jobs.eval_cmds import eval_job_config
from jobs.flags import build, dest_paths, flagged_fields
from jobs.generate_cmds import run_settings
from jobs.retrain_cmd import generation_settings, retrain_config
from vae_core.config import ModelConfig, RayTrainConfig, RetrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.errors import VaegenError
from vae_core.presets import PRESETS, fmnist_best, layer_preset, preset_job
from vae_core.use_configs import ClassifierConfig, EvalJobConfig, GenerateConfig

TRAINING_VERBS = ("train", "retrain", "pipeline")
REPO = pathlib.Path(__file__).resolve().parents[2]


def leaf(verb: str) -> argparse.ArgumentParser:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


def job_of(argv: list[str]) -> TrainJobConfig:
    return train_job_config(parse_args(build_parser(), argv))


def shown(capsys, tmp_path, argv: list[str]) -> str:
    """`vaegen config show ARGV` written to a file, as `... > f.toml` does."""
    assert vaegen(["config", "show", *argv]) == 0
    path = tmp_path / "shown.toml"
    path.write_text(capsys.readouterr().out)
    return str(path)


@pytest.mark.parametrize("verb", TRAINING_VERBS)
@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_config_show_round_trips_to_the_same_job(verb, preset, capsys, tmp_path):
    """config show … > f.toml; vaegen VERB --config f.toml gives exactly the same TrainJobConfig, presets applied."""
    argv = [verb, *(["--preset", preset] if preset else [])]
    path = shown(capsys, tmp_path, argv)
    assert job_of([verb, "--config", path]) == job_of(argv)
    if preset:
        text = open(path).read()
        expected = PRESETS[preset].job()
        assert f'arch = "{expected.model.arch}"' in text and f"epochs = {expected.train.epochs}" in text
        assert job_of(argv) == dataclasses.replace(expected, ray=job_of(argv).ray)   # every setting is the recipe's


@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_with_flags_and_ray_settings(preset, capsys, tmp_path):
    argv = ["train", "--preset", preset, "--epochs", "4", "--workers", "3", "--stream-epochs", "--keep-checkpoints",
            "5", "--name", "mine", "--root", str(tmp_path / "r"), "--s3-endpoint", "http://127.0.0.1:9"]
    path = shown(capsys, tmp_path, argv)
    job = job_of(argv)
    assert job.ray == RayTrainConfig(workers=3, stream_epochs=True, checkpoints_to_keep=5)
    assert (job.train.epochs, job.name, job.model) == (4, "mine", PRESETS[preset].job().model)
    assert job_of(["train", "--config", path]) == job


def test_flags_win_over_the_file_and_a_preset_in_the_file_applies_under_both(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('preset = "fmnist-best"\nepochs = 7\nlatent-dim = 8\n')
    job = job_of(["train", "--config", str(path), "--latent-dim", "4", "--conditional"])
    assert (job.train.epochs, job.model.latent_dim, job.conditional) == (7, 4, True)       # file, flag, flag
    assert (job.model.arch, job.train.lr_schedule, job.name) == ("conv", "cosine", "fmnist-best")  # the preset
    on_the_line = job_of(["train", "--config", str(path), "--preset", "mlp-classic"])
    assert (on_the_line.model.arch, on_the_line.train.epochs, on_the_line.name) == ("mlp", 7, "mlp-classic")


def test_presets_are_typed_recipes_with_their_exact_settings():
    assert fmnist_best() == preset_job("fmnist-best") == TrainJobConfig(
        name="fmnist-best",
        model=ModelConfig(arch="conv", conv_channels=(32, 64), hidden_dim=512, latent_dim=32, prior_components=100),
        train=TrainConfig(epochs=100, batch_size=128, lr=1e-3, lr_schedule="cosine", kl_warmup_epochs=5,
                          binarize=True, patience=100, val_fraction=0.02, output_init="default", adam="for-loop"))
    cond = PRESETS["fmnist-cond"].job()
    assert cond.conditional and (cond.model.likelihood, cond.model.sigma, cond.train.epochs) == ("gaussian", 0.2, 36)
    classic = PRESETS["mlp-classic"].job()
    assert classic.model == ModelConfig() and classic.train == TrainConfig(val_fraction=0.02)
    for name, preset in PRESETS.items():
        assert isinstance(preset.job(), TrainJobConfig) and preset.job().name == name


def test_a_preset_fills_only_what_is_not_kept():
    mine = TrainJobConfig(train=TrainConfig(epochs=3), storage=StorageConfig(root="/x"))
    layered = layer_preset("fmnist-best", mine, keep={"train.epochs"})
    assert (layered.train.epochs, layered.train.patience, layered.storage.root) == (3, 100, "/x")
    assert layer_preset("fmnist-best", mine, keep=set()).train.epochs == 100


@pytest.mark.parametrize("verb", ["train", "retrain", "pipeline", "generate", "reconstruct"])
def test_every_config_flag_is_the_one_declared_beside_its_field(verb):
    """The parser's flag for a field has the field's flag name, dest, help and default: nothing is restated."""
    cls = TrainJobConfig if verb in TRAINING_VERBS else GenerateConfig
    actions = {a.dest: a for a in leaf(verb)._actions}
    found = 0
    for _, field, _, _ in flagged_fields(cls):
        action = actions.get(field.name)
        if action is None:
            continue
        found += 1
        assert field.metadata["flag"] in action.option_strings, (verb, field.name)
        assert action.help.startswith(field.metadata["help"]), (verb, field.name)
        if field.default is not dataclasses.MISSING and not action.required and field.name != "workers":
            expected = field.default if verb != "pipeline" or field.name != "count" else 10_000
            assert action.default == expected, (verb, field.name)
    assert found >= (30 if cls is TrainJobConfig else 5)


def test_renamed_flags_land_in_their_fields():
    job = job_of(["train", "--arch", "conv", "--keep-checkpoints", "4", "--stream-epochs", "--workers", "1"])
    assert job.model.arch == "conv" and job.ray.checkpoints_to_keep == 4 and job.ray.stream_epochs is True
    assert dest_paths(TrainJobConfig)["arch"] == "model.arch"
    assert job_of(["pipeline"]).ray == RayTrainConfig(workers="auto")         # pipeline trains on Ray by default
    assert job_of(["train"]).ray is None and job_of(["train"]).name == "fashion-mnist-mlp"
    assert job_of(["train", "--arch", "conv", "--conditional"]).name == "fashion-mnist-conv-cond"


@pytest.mark.parametrize("flags, named", [
    (["--sync-every", "2"], "--sync-every applies only to Ray Train: add --workers N"),
    (["--keep-checkpoints", "3", "--address", "auto"], "--address, --keep-checkpoints apply only to Ray Train"),
])
def test_ray_train_flags_without_workers_are_refused(flags, named, capsys):
    assert vaegen(["train", *flags]) == 2
    assert named in capsys.readouterr().err


def test_generate_flags_build_the_job_spec(tmp_path):
    args = parse_args(build_parser(), ["generate", "--model", "m@v0001", "--count", "30", "--labels", "1", "2",
                                       "--pixels", "mean", "--root", str(tmp_path)])
    assert build(GenerateConfig, args, kind="samples") == GenerateConfig(model="m@v0001", count=30, labels=(1, 2),
                                                                         pixels="mean")


def module_imports(path: pathlib.Path) -> set[str]:
    """The jobs.* modules a jobs/ module imports (anywhere in it, top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs."):
            found.add(node.module.removeprefix("jobs."))
    return found


def test_jobs_has_no_import_cycle():
    graph = {p.stem: module_imports(p) for p in (REPO / "jobs").glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or n not in seen and reaches(n, goal, seen | {n}) for n in graph.get(start, ()))
    assert [m for m in graph if reaches(m, m, {m})] == []


# A bad flag is refused in a fraction of a second: before torch (seconds to import) or any model is loaded.
REFUSED_BEFORE_TORCH = {
    "train": (["train", "--dataset", "fm", "--name", ".."], "--name='..'"),
    "sample": (["sample", "--model", "tiny", "--count", "0"], "--count=0"),
    "evaluate": (["evaluate", "--model", "../tiny"], "--model="),
    "generate": (["generate", "--model", "tiny", "--count", "8", "--cpus-per-worker", "nan"], "--cpus-per-worker=nan"),
    "reconstruct": (["reconstruct", "--model", "tiny", "--dataset", "a/b"], "--dataset="),
    "retrain": (["retrain", "--dataset", "fm", "--name", "../tiny"], "--name="),
}


@pytest.mark.parametrize("verb", sorted(REFUSED_BEFORE_TORCH))
def test_a_bad_flag_is_refused_before_torch_is_imported(verb, tmp_path):
    argv, fragment = REFUSED_BEFORE_TORCH[verb]
    status, imported, stderr = vaegen_in_a_fresh_process([*argv, "--root", str(tmp_path / "root")])
    assert status == 2 and fragment in stderr, stderr[-2000:]
    assert imported == [], stderr[-2000:]


def test_no_help_text_carries_measured_figures():
    """Help says what a setting does; speed-ups and timings belong to docs/BENCHMARKS.md."""
    figure = re.compile(r"~\s*\d|\b\d+(\.\d+)?\s*x\b|\b\d+(\.\d+)?\s*(s|ms|min|%)\b|\bfaster\b")
    for verb in ("train", "retrain", "pipeline", "generate", "reconstruct"):
        for action in leaf(verb)._actions:
            assert not figure.search(action.help or ""), (verb, action.help)


# -- evaluate, retrain, generate, reconstruct, pipeline: every flag is a config field's ---------------------------
VERB_CONFIGS = {
    "evaluate": (EvalJobConfig, RunSettings),
    "retrain": (TrainJobConfig, RetrainConfig, RunSettings),
    "generate": (GenerateConfig, RunSettings, StorageConfig),
    "reconstruct": (GenerateConfig, RunSettings, StorageConfig),
    "pipeline": (TrainJobConfig, GenerateConfig, RunSettings),
}
# Flags that map to no config field: argparse's own, the config file, a preset's name (it picks a recipe that
# returns a whole config), what retrain does after its contest, pipeline's ingest source, and
# --model on a training verb (one line naming --arch).
NO_FIELD = {"help", "config", "preset", "then_generate", "source", "renamed_model"}
# Defaults a verb sets for itself: --workers off on retrain (one process unless given), auto on pipeline.
VERB_DEFAULTS = {("retrain", "workers"): None, ("pipeline", "workers"): "auto", ("pipeline", "count"): 10_000}


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


@pytest.mark.parametrize("verb", list(VERB_CONFIGS))
def test_every_flag_of_a_verb_is_declared_beside_a_config_field(verb):
    """No flag of these verbs is written out by hand: each has the name, dest, help and default of a field."""
    fields = [f for cls in VERB_CONFIGS[verb] for _, f, _, _ in flagged_fields(cls)]
    for action in leaf(verb)._actions:
        if action.dest in NO_FIELD:
            continue
        declared = [f for f in fields if f.name == action.dest and f.metadata["flag"] in action.option_strings]
        assert declared, (verb, action.option_strings, "is declared by no config field")
        default = VERB_DEFAULTS.get((verb, action.dest))
        assert any(action.help.startswith(f.metadata["help"]) and (action.required or action.default == (
            default if (verb, action.dest) in VERB_DEFAULTS else field_default(f))) for f in declared), \
            (verb, action.option_strings)


def args_of(argv: list[str]) -> argparse.Namespace:
    return parse_args(build_parser(), argv)


EVALUATE = ["evaluate", "--model", "m@v0002", "--k", "7", "--limit", "3", "--split", "val", "--seed", "5",
            "--samples", "20", "--no-quality", "--classifier-epochs", "2", "--batch-size", "9", "--root", "/r",
            "--s3-endpoint", "http://127.0.0.1:9", "--no-progress"]
RETRAIN = ["retrain", "--margin", "0.5", "--warm-start", "--eval-split", "val", "--eval-seed", "3",
           "--eval-max-images", "40", "--epochs", "2", "--workers", "3", "--cpus-per-worker", "2",
           "--address", "auto", "--no-progress", "--then-generate", "6"]
GENERATE = ["generate", "--model", "m", "--count", "30", "--workers", "3", "--cpus-per-worker", "1.5",
            "--gpus-per-worker", "0.25", "--address", "auto", "--max-restarts", "0", "--no-progress", "--root", "/r"]


def test_evaluate_flags_land_in_their_fields():
    args = args_of(EVALUATE)
    assert eval_job_config(args) == EvalJobConfig(
        model="m@v0002", k=7, limit=3, split="val", seed=5, samples=20, quality=False, batch_size=9,
        classifier=ClassifierConfig(epochs=2, seed=5),              # the classifiers share the evaluation's seed
        storage=StorageConfig(root="/r", s3_endpoint="http://127.0.0.1:9"))
    assert args.progress is False
    assert eval_job_config(args_of(["evaluate", "--model", "m"])) == EvalJobConfig(model="m")


def test_retrain_flags_land_in_their_fields():
    args = args_of(RETRAIN)
    cfg = retrain_config(args)
    assert cfg == RetrainConfig(job=cfg.job, margin=0.5, warm_start=True, eval_split="val", eval_seed=3,
                                eval_max_images=40)
    assert cfg.job.train.epochs == 2 and cfg.job.ray == RayTrainConfig(workers=3, cpus_per_worker=2.0)
    # --then-generate decodes with generate's own worker settings: --workers here were Ray Train's.
    assert generation_settings(args) == RunSettings(address="auto", progress=False)
    assert retrain_config(args_of(["retrain"])) == RetrainConfig(job=job_of(["train"]))


@pytest.mark.parametrize("verb, job_flags", [("generate", ["--count", "30"]), ("reconstruct", ["--dataset", "d"])])
def test_run_settings_flags_land_in_their_fields(verb, job_flags):
    args = args_of([verb, "--model", "m", *job_flags, *GENERATE[5:]])
    assert run_settings(args) == RunSettings(workers=3, cpus_per_worker=1.5, gpus_per_worker=0.25, address="auto",
                                             max_restarts=0, progress=False)
    assert run_settings(args_of([verb, "--model", "m", *job_flags])) == RunSettings()


def test_pipeline_shares_the_address_and_progress_flags():
    args = args_of(["pipeline", "--address", "auto", "--no-progress"])
    assert (args.address, args.progress) == ("auto", False)


@pytest.mark.parametrize("argv", [EVALUATE, ["evaluate", "--model", "m"]])
def test_config_show_round_trips_evaluate(argv, capsys, tmp_path):
    path = shown(capsys, tmp_path, argv)
    again = args_of(["evaluate", "--config", path])
    assert eval_job_config(again) == eval_job_config(args_of(argv))
    assert again.progress == args_of(argv).progress


@pytest.mark.parametrize("argv", [RETRAIN, ["retrain", "--preset", "fmnist-best", "--margin", "1"]])
def test_config_show_round_trips_retrain(argv, capsys, tmp_path):
    path = shown(capsys, tmp_path, argv)
    again, first = args_of(["retrain", "--config", path]), args_of(argv)
    assert retrain_config(again) == retrain_config(first)
    assert generation_settings(again) == generation_settings(first)
    assert again.then_generate == first.then_generate


@pytest.mark.parametrize("argv", [GENERATE, ["reconstruct", "--model", "m", "--dataset", "d", "--split", "val",
                                             "--format", "png", "--workers", "4"]])
def test_config_show_round_trips_generate(argv, capsys, tmp_path):
    path = shown(capsys, tmp_path, argv)
    again, first = args_of([argv[0], "--config", path]), args_of(argv)
    kind = "samples" if argv[0] == "generate" else "reconstructions"
    assert build(GenerateConfig, again, kind=kind) == build(GenerateConfig, first, kind=kind)
    assert run_settings(again) == run_settings(first)
    assert storage_config(again) == storage_config(first)


@pytest.mark.parametrize("verb", ["train", "retrain", "pipeline"])
def test_model_on_a_training_verb_is_one_line_naming_arch(verb, tmp_path):
    with pytest.raises(VaegenError, match=r"^--model names a published model .*the architecture to train is --arch"):
        parse_args(build_parser(), [verb, "--model", "conv"])
    config = tmp_path / "v.toml"
    config.write_text('model = "conv"\n')
    with pytest.raises(VaegenError, match=r"'model': --model names a published model .* --arch"):
        parse_args(build_parser(), [verb, "--config", str(config)])
