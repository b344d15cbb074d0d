"""`vaegen submit` and `vaegen jobs` against a real Ray head (`ray start --head`, token auth on, as Ray 2.60
does by default) and a real S3 endpoint (moto over HTTP). The head is this module's own: its own ports and temp
dir, its own process group, killed by pid at the end, so other Ray instances on the machine are left alone."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import free_port, free_ports

from cluster.data.datasets import ingest
from cluster.runtime.submit import (
    SubmitConfig,
    base_submission_id,
    find_token,
    identity_key,
    is_loopback_url,
    job_env,
    job_server_address,
)
from cluster.store.layout import JobKeys
from cluster.store.registry import Registry, swap_champion
from cluster.store.storage import Storage
from cluster.train.driver import train_model
from jobs.ops_cmds import check_command
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError
from vae_core.models import build_model

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(s3_server, starts_ray):
    """A Ray head with its job server on 127.0.0.1, started after the S3 fixture so that, like a cluster fed
    from a Kubernetes Secret, it has the storage credentials in its own environment."""
    import ray
    ray.shutdown()                                        # no in-process Ray competing for the two cores
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(16))
    flags = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
             "--object-manager-port")
    ports = dict(zip(flags, free_ports(len(flags))))
    dashboard = ports["--dashboard-port"]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, OMP_NUM_THREADS="1",
               PATH=f"{VENV_BIN}:{os.environ['PATH']}")          # `python` in job entrypoints = this venv's
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(100 * 2**20),
           "--temp-dir", temp_dir, "--disable-usage-stats", *(str(x) for kv in ports.items() for x in kv)]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300              # a hang guard: `ray start` is slow on a busy machine
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=1).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up: {open(log.name).read()[-2000:]}")
            time.sleep(0.5)
        yield {"address": address, "token_path": token_path, "s3_endpoint": s3_server}
    finally:
        stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to the head's process group (`ray start --block` then stops what it started), SIGKILL if it lingers;
    then any straggler of this head (its processes name its own temp dir, e.g. workers in their own process
    group) is killed by pid."""
    with contextlib.suppress(ProcessLookupError):            # a head that failed to start has exited already
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
    for pid in own_processes(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def own_processes(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def s3_dataset(ray_head, small_fashion):
    (train_x, train_y), (test_x, test_y) = small_fashion
    cfg = StorageConfig(root=f"s3://vaegen-test/submit-{uuid.uuid4().hex[:8]}", s3_endpoint=ray_head["s3_endpoint"])
    splits = {"train": ArraySplit(train_x[:500], train_y[:500]), "test": ArraySplit(test_x[:200], test_y[:200])}
    ingest(Storage(cfg), "fm", ArrayDataset(splits, tuple(str(i) for i in range(10)), "test"), progress=False)
    return cfg


def vaegen(*argv: str, token_path: str | None, home: str | None = None, timeout: int = 300,
           extra_env: dict[str, str] | None = None):
    """The CLI as a user runs it; the token comes from the environment, as on a laptop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), **(extra_env or {}))
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    if home:
        env["HOME"] = home
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_argv(cfg: StorageConfig, dataset: str = "fm") -> list[str]:
    return ["train", "--root", cfg.root, "--s3-endpoint", cfg.s3_endpoint, "--dataset", dataset, "--name", "fm-vae",
            "--max-images", "500", "--epochs", "1", "--hidden-dim", "64", "--latent-dim", "4", "--no-progress"]


def test_submit_wait_trains_into_s3_and_a_resubmission_is_reported_not_rerun(ray_head, s3_dataset):
    address, token = ray_head["address"], ray_head["token_path"]
    run = vaegen("submit", "--address", address, "--wait", "--", *train_argv(s3_dataset), token_path=token)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    submission_id = base_submission_id(tuple(train_argv(s3_dataset)))
    assert f"submitted {submission_id}" in run.stdout
    assert "published fm-vae@v0001" in run.stdout              # the job's own output, followed live
    assert Registry(Storage(s3_dataset)).versions("fm-vae") == ["v0001"]

    again = vaegen("submit", "--address", address, "--wait", "--", *train_argv(s3_dataset), token_path=token)
    assert again.returncode == 0, again.stderr
    assert f"already ran as {submission_id} and succeeded; not running it again" in again.stdout
    assert Registry(Storage(s3_dataset)).versions("fm-vae") == ["v0001"]

    listed = vaegen("jobs", "list", "--address", address, token_path=token)
    assert [ln for ln in listed.stdout.splitlines() if ln.startswith(submission_id)] == [
        next(ln for ln in listed.stdout.splitlines() if submission_id in ln)]
    status = vaegen("jobs", "status", "--address", address, submission_id, token_path=token)
    assert status.stdout.strip() == f"{submission_id} SUCCEEDED"
    logs = vaegen("jobs", "logs", "--address", address, submission_id, token_path=token)
    assert "published fm-vae@v0001" in logs.stdout
    stop = vaegen("jobs", "stop", "--address", address, submission_id, token_path=token)
    assert stop.stdout.strip() == f"{submission_id}: not running (nothing to stop)"
    unknown = vaegen("jobs", "status", "--address", address, "vaegen-train-000000000000", token_path=token)
    assert unknown.returncode == 2 and unknown.stderr.startswith("vaegen: error: job vaegen-train-000000000000")


def test_a_config_file_travels_with_the_job(ray_head, s3_dataset, tmp_path):
    """--config names a file on this machine; the job gets the file itself (the cluster cannot read our disk)."""
    settings = tmp_path / "nightly.toml"
    settings.write_text('name = "fm-config"\nepochs = 1\nhidden-dim = 48\n')
    argv = ["train", "--config", str(settings), "--root", s3_dataset.root, "--s3-endpoint", s3_dataset.s3_endpoint,
            "--dataset", "fm", "--max-images", "500", "--latent-dim", "4", "--no-progress"]
    run = vaegen("submit", "--address", ray_head["address"], "--wait", "--", *argv, token_path=ray_head["token_path"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "published fm-config@v0001" in run.stdout
    assert Registry(Storage(s3_dataset)).load("fm-config").model.cfg.hidden_dim == 48
    shipped = ("train", "--config", "nightly.toml", *argv[3:])
    assert f"submitted {base_submission_id(shipped, files=(('nightly.toml', settings.read_bytes()),))}" in run.stdout
    assert base_submission_id(shipped, files=(("nightly.toml", b"epochs = 2\n"),)) not in run.stdout   # edited: new


def test_a_spec_submitted_while_it_runs_is_attached_to_not_started_again(ray_head, s3_dataset):
    """The first job asks for more driver CPUs than the head has, so it stays PENDING (an active job) for as long
    as the test needs, however fast or loaded the machine: the second submit of the same spec (the CPU
    reservation is not part of the spec) must find it rather than start another."""
    address, token = ray_head["address"], ray_head["token_path"]
    argv = [*train_argv(s3_dataset), "--name", "fm-attach"]
    first = vaegen("submit", "--address", address, "--no-wait", "--entrypoint-num-cpus", "64", "--", *argv,
                   token_path=token)                           # it never starts: waiting would never end
    assert first.returncode == 0 and "submitted vaegen-train-" in first.stdout, first.stderr[-2000:]
    submission_id = base_submission_id(tuple(argv))
    try:
        second = vaegen("submit", "--address", address, "--no-wait", "--", *argv, token_path=token)
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"already submitted as {submission_id} (running); not submitting it again" in second.stdout
        listed = vaegen("jobs", "list", "--address", address, token_path=token).stdout
        assert [ln.split()[0] for ln in listed.splitlines() if ln.startswith(submission_id)] == [submission_id]
    finally:
        vaegen("jobs", "stop", "--address", address, submission_id, token_path=token)
    assert Registry(Storage(s3_dataset)).versions("fm-attach") == []


def train_tiny(cfg: StorageConfig, name: str, seed: int = 0) -> str:
    job = TrainJobConfig(storage=cfg, dataset="fm", name=name, model=ModelConfig(hidden_dim=32, latent_dim=2),
                         train=TrainConfig(epochs=1, max_images=500, seed=seed))
    return train_model(job, progress=False).ref.version              # job.ray is None: one process


def test_generate_with_the_champion_is_a_new_job_once_the_champion_changes(ray_head, s3_dataset):
    """`generate --model m@champion` names a different model after a promotion: submit pins the version before
    computing the job's identity, so the second submit runs the new champion instead of reporting the old
    job as already succeeded; the same command with the same champion is still found, not rerun."""
    address, token = ray_head["address"], ray_head["token_path"]
    registry = Registry(Storage(s3_dataset))
    first_version = train_tiny(s3_dataset, "fm-champ")
    assert swap_champion(registry, "fm-champ", {"version": first_version}, expected_version=None)
    argv = ["generate", "--model", "fm-champ@champion", "--count", "20", "--shard-size", "10", "--workers", "1",
            "--root", s3_dataset.root, "--s3-endpoint", s3_dataset.s3_endpoint, "--no-progress"]
    run = vaegen("submit", "--address", address, "--wait", "--", *argv, token_path=token)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"--model fm-champ@champion is fm-champ@{first_version} now" in run.stdout

    second_version = train_tiny(s3_dataset, "fm-champ", seed=1)       # the same settings again would be the same run
    assert swap_champion(registry, "fm-champ", {"version": second_version}, expected_version=first_version)
    again = vaegen("submit", "--address", address, "--wait", "--", *argv, token_path=token)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"is fm-champ@{second_version} now" in again.stdout and "already ran" not in again.stdout
    assert "vaegen: submitted vaegen-generate-" in again.stdout
    models = [json.loads(Storage(s3_dataset).read_bytes(JobKeys.of(job).manifest))["model"]
              for job in Storage(s3_dataset).list_dirs("outputs")]
    assert sorted(models) == sorted([f"fm-champ@{first_version}", f"fm-champ@{second_version}"])

    same = vaegen("submit", "--address", address, "--", *argv, token_path=token)     # champion unchanged
    assert same.returncode == 0 and "succeeded; not running it again" in same.stdout


def test_moving_model_specs_are_pinned_into_the_spec(local_storage_config):
    registry = Registry(Storage(local_storage_config))
    files = checkpoint_files(build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=16, latent_dim=2)))
    registry.publish("m", files)
    registry.publish("m", files)
    assert swap_champion(registry, "m", {"version": "v0001"}, expected_version=None)
    tail = ["--count", "10", "--root", local_storage_config.root]
    pinned = {spec: check_command(["--", "generate", "--model", spec, *tail]) for spec in
              ("m", "m@champion", "m@latest", "m@2", "m@v0001")}
    assert {spec: argv[2] for spec, (argv, _, _) in pinned.items()} == {
        "m": "m@v0001", "m@champion": "m@v0001", "m@latest": "m@v0002", "m@2": "m@v0002", "m@v0001": "m@v0001"}
    assert all(dedup for _, _, dedup in pinned.values())
    before = base_submission_id(pinned["m@champion"][0])
    assert swap_champion(registry, "m", {"version": "v0002"}, expected_version="v0001")
    after = base_submission_id(check_command(["--", "generate", "--model", "m@champion", *tail])[0])
    assert before != after and after == base_submission_id(pinned["m@latest"][0])
    assert check_command(["--", "generate", "--model=m@champion", *tail])[0][1] == "--model=m@v0002"


def test_a_training_verb_is_not_pinned_to_a_registry_version(capsys):
    """retrain and train name an architecture (--arch): submit must not look anything up in a registry (the
    CronJob's pod has no route to it) nor give up de-duplication."""
    unreachable = ["--root", "s3://vaegen-test/x", "--s3-endpoint", f"http://127.0.0.1:{free_port()}"]
    for verb in ("retrain", "train"):
        argv, _, dedup = check_command(["--", verb, "--arch", "conv", *unreachable])
        assert dedup and argv[1:3] == ("--arch", "conv")
    assert "de-duplication" not in capsys.readouterr().out


def test_a_registry_this_machine_cannot_read_is_not_deduplicated(capsys):
    unreachable = ["--root", "s3://vaegen-test/x", "--s3-endpoint", f"http://127.0.0.1:{free_port()}",
                   "--s3-timeout", "1"]
    argv, _, dedup = check_command(["--", "generate", "--model", "m@champion", "--count", "10", *unreachable])
    assert not dedup and argv[2] == "m@champion"
    assert "submitting without de-duplication" in capsys.readouterr().out
    cfg = SubmitConfig(address="http://127.0.0.1:9", argv=argv, deduplicate=False)
    assert base_submission_id(argv, identity_key(cfg)) != base_submission_id(argv, identity_key(cfg))
    # A fixed version names one model whatever the registry says: its argv identity stays.
    argv, _, dedup = check_command(["--", "generate", "--model", "m@v0001", "--count", "10", *unreachable])
    assert dedup and argv[2] == "m@v0001"


def submit_here(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """`vaegen submit ...` in this process (no interpreter start), with no Ray token in the environment."""
    from jobs.cli import main
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    code = main(["submit", *argv])
    return code, capsys.readouterr().err


def test_a_malformed_model_spec_is_refused_before_anything_is_sent(local_storage_config, monkeypatch, capsys):
    code, err = submit_here(monkeypatch, capsys, "--address", "http://127.0.0.1:9", "--", "generate", "--model",
                            "m@../x", "--count", "10", "--root", local_storage_config.root)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("vaegen: error: --model='m@../x'")


def test_a_failing_job_makes_submit_exit_non_zero_with_the_jobs_error(ray_head, s3_dataset):
    run = vaegen("submit", "--address", ray_head["address"], "--wait", "--", *train_argv(s3_dataset, "no-such-data"),
                 token_path=ray_head["token_path"])
    assert run.returncode == 2                                  # the job's own exit code: vaegen's bad input
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("vaegen: error: job vaegen-train-") and " FAILED: " in last
    assert "no dataset 'no-such-data'" in last


def test_the_cluster_token_is_required_and_never_printed(ray_head, tmp_path):
    argv = ("submit", "--address", ray_head["address"], "--", "ingest", "fashion-mnist")
    missing = vaegen(*argv, token_path=None, home=str(tmp_path))
    assert missing.returncode == 2
    assert "needs a token and none was found" in missing.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    refused = vaegen(*argv, token_path=str(wrong), home=str(tmp_path))
    assert refused.returncode == 2 and "refused our token" in refused.stderr
    token = Path(ray_head["token_path"]).read_text()
    assert token not in missing.stdout + missing.stderr + refused.stdout + refused.stderr


def test_unreachable_address_is_one_clear_error(monkeypatch, capsys):
    code, err = submit_here(monkeypatch, capsys, "--address", f"http://127.0.0.1:{free_port()}", "--", "ingest",
                            "fashion-mnist")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("vaegen: error: cannot reach the Ray job server at http://127.0.0.1:")


@pytest.mark.parametrize("command, message", [
    (["--", "fly", "--to", "moon"], "unknown vaegen verb 'fly' after `--`"),
    (["--", "submit", "--", "train"], "unknown vaegen verb 'submit' after `--`"),
    ([], "nothing to submit"),
])
def test_bad_commands_are_refused_before_anything_is_sent(command, message, monkeypatch, capsys):
    code, err = submit_here(monkeypatch, capsys, "--address", "http://127.0.0.1:9", *command)
    assert code == 2 and message in err


def test_credentials_stay_out_of_the_job_spec_unless_asked_for():
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    assert job_env(False, environ) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    assert job_env(True, environ)["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    with pytest.raises(VaegenError, match="--pass-credentials"):
        job_env(True, {"AWS_REGION": "eu-west-1"})


def test_the_submission_id_follows_the_spec():
    a = base_submission_id(("train", "--epochs", "1"))
    assert a == base_submission_id(("train", "--epochs", "1"))
    assert a != base_submission_id(("train", "--epochs", "2"))
    assert a != base_submission_id(("train", "--epochs", "1"), key="retrain-29061440")
    assert a.startswith("vaegen-train-")


# -- `ray job submit`'s conventions: address variables, waiting by default, --submission-id, the token's places ------
def test_submit_follows_ray_job_submit_against_a_real_head(ray_head, s3_dataset, tmp_path):
    """No --address and no --wait: RAY_API_SERVER_ADDRESS names the head (RAY_ADDRESS, lower in Ray's order, names
    nothing), the token comes from RAY_AUTH_TOKEN, and submit waits for the job like `ray job submit`. The laptop's
    loopback AWS_ENDPOINT_URL is not in the job's environment; the job reaches S3 through its own --s3-endpoint."""
    from ray.job_submission import JobSubmissionClient
    token = Path(ray_head["token_path"]).read_text()
    env = {"RAY_API_SERVER_ADDRESS": ray_head["address"], "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
           "RAY_AUTH_TOKEN": token, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "us-east-1"}
    argv = ["ls", "--root", s3_dataset.root, "--s3-endpoint", s3_dataset.s3_endpoint]
    sid = f"readme-ls-{uuid.uuid4().hex[:6]}"
    run = vaegen("submit", "--submission-id", sid, "--", *argv, token_path=None, extra_env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"submitted {sid} to {ray_head['address']}" in run.stdout
    assert f"job {sid} SUCCEEDED" in run.stdout and "fm" in run.stdout        # waited, and followed its output
    assert "not passing AWS_ENDPOINT_URL=http://127.0.0.1:9000" in run.stderr
    assert token not in run.stdout + run.stderr
    info = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {token}"}).get_job_info(sid)
    assert info.runtime_env["env_vars"] == {"AWS_REGION": "us-east-1"}

    again = vaegen("submit", "--no-wait", "--submission-id", sid, "--", *argv, token_path=None, extra_env=env)
    assert again.returncode == 0 and f"already ran as {sid} and succeeded" in again.stdout
    other = vaegen("submit", "--no-wait", "--submission-id", sid, "--", "ls", "--root", s3_dataset.root,
                   token_path=None, extra_env=env)
    assert other.returncode == 2 and f"--submission-id {sid} is taken by another job" in other.stderr

    home = tmp_path / "home"                                   # the default place: ~/.ray/auth_token
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    listed = vaegen("jobs", "list", token_path=None, home=str(home),
                    extra_env={"RAY_API_SERVER_ADDRESS": ray_head["address"]})
    assert listed.returncode == 0 and sid in listed.stdout, listed.stderr


def test_the_job_server_address_follows_ray_s_order():
    flag = "http://flag:8265"
    assert job_server_address(None, {}) == ("http://127.0.0.1:8265", "")
    assert job_server_address(flag, {})[0] == flag
    assert job_server_address(flag, {"RAY_ADDRESS": "http://env:8265"})[0] == "http://env:8265"
    both = {"RAY_ADDRESS": "http://env:8265", "RAY_API_SERVER_ADDRESS": "http://api:8265"}
    address, note = job_server_address(flag, both)
    assert address == "http://api:8265" and "RAY_API_SERVER_ADDRESS=http://api:8265 overrides --address" in note


def test_the_environment_s_address_is_the_one_used_and_said(monkeypatch, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", closed)
    from jobs.cli import main
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "ingest", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert f"RAY_API_SERVER_ADDRESS={closed} overrides --address http://127.0.0.1:9" in err
    assert err.strip().splitlines()[-1].startswith(f"vaegen: error: cannot reach the Ray job server at {closed}")


def test_submit_waits_by_default_and_no_wait_opts_out():
    from jobs.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["submit", "--", "ls"]).wait is True
    assert parse(["submit", "--no-wait", "--", "ls"]).wait is False
    assert parse(["submit", "--wait", "--", "ls"]).wait is True              # still accepted
    with pytest.raises(VaegenError, match="--submission-id"):
        SubmitConfig(address="http://127.0.0.1:9", argv=("ls",), submission_id="../x")


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:9000", True), ("http://localhost:9000", True), ("http://[::1]:9000", True),
    ("https://127.8.0.1", True), ("http://LOCALHOST.:9000/", True), ("127.0.0.1:9000", True),
    ("http://minio:9000", False), ("http://vaegen-minio.vaegen.svc:9000", False), ("https://s3.amazonaws.com", False),
    ("http://10.0.0.5:9000", False)])
def test_a_loopback_endpoint_is_not_forwarded_into_the_job(url, loopback):
    assert is_loopback_url(url) is loopback
    env = job_env(False, {"AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url, "AWS_REGION": "eu-west-1"})
    assert env == ({"AWS_REGION": "eu-west-1"} if loopback else
                   {"AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url, "AWS_REGION": "eu-west-1"})


def test_the_token_is_found_where_ray_documents_it(tmp_path, monkeypatch):
    """RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (unreadable or empty: an error, no fall-back),
    else ~/.ray/auth_token; read without Ray's private modules."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "named"
    named.write_text("from-path")
    assert find_token({}) == "from-home"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(named)}) == "from-path"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "from-env"}) == "from-env"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": " "}) == "from-path"
    with pytest.raises(VaegenError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("")
    with pytest.raises(VaegenError, match="is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})
    source = (REPO / "cluster" / "runtime" / "submit.py").read_text()
    assert "_raylet" not in source and "ray._private" not in source


def test_an_unreadable_token_path_is_one_line_before_anything_is_sent(tmp_path, monkeypatch, capsys):
    from jobs.cli import main
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "ingest", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RAY_AUTH_TOKEN_PATH=" in err and "cannot be read" in err
