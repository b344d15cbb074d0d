"""`vaegen` used as a careless or hostile user would: hostile names, corrupt and truncated files, wrong types in
--config, absurd resource requests, bad URIs and unreachable or unwelcoming S3. For every case the real CLI,
in its own process, must refuse with exit code 2 and exactly one line `vaegen: error: ...` on stderr, print no
traceback, and leave the storage root as it was: the whole folder around it (paths, sizes, sha256) and, for
S3 cases, every object of every bucket on the endpoint are compared before and after.

Every case fails before Ray starts. The cases share one small root (a slice of Fashion-MNIST and one tiny
published model, built in-process once), copied per case, and run in parallel threads (a process start with
torch costs seconds)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import free_port

from cluster.store.layout import JobKeys

REPO = Path(__file__).resolve().parents[2]
BUCKET = "vaegen-test"
MODEL = "models/tiny/v0001"
JOB = JobKeys.of("samples-00aa")                 # a job that `show` finds damaged
CASE_TIMEOUT_S = 180
PARALLEL = max(2, os.cpu_count() or 2)


@dataclass
class Ctx:
    """Where one case runs: `dir` (the cwd, and the snapshot's top) holds `root`, the copied storage root."""
    dir: Path
    root: Path
    s3_root: str            # a fresh prefix in the shared test bucket (empty unless the case fills it)
    endpoint: str           # the moto server
    auth_endpoint: str      # a moto server that checks credentials (ours are not known to it)
    closed: str             # http://127.0.0.1:<a port nobody listens on>


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]                         # {root} {dir} {s3root} {s3} {auth} {closed} are filled in
    setup: Callable[[Ctx], None] | None = None    # damage the copy, or write the inputs the command reads
    fragment: str = ""                            # expected in the error line
    needs: str = ""                               # the area whose fix this case waits for (xfail until then)
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""                                 # relative to the case folder
    s3: bool = False                              # also compare the buckets before and after


# -- damage ----------------------------------------------------------------------------------------------------
def truncate(pattern: str, keep: float = 0.5) -> Callable[[Ctx], None]:
    """Cut the one file under the root that matches `pattern` (a glob: shard folders have generated names)."""
    def run(ctx: Ctx) -> None:
        [path] = ctx.root.glob(pattern)
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
    return run


def write(rel: str, data: bytes, under_root: bool = False) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        path = (ctx.root if under_root else ctx.dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return run


def toml(text: str) -> Callable[[Ctx], None]:
    return write("vaegen.toml", text.encode())


def both(*steps: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        for step in steps:
            step(ctx)
    return run


def edit_model_config(change: Callable[[dict], None], weights: bytes | None = None) -> Callable[[Ctx], None]:
    """Rewrite the tiny model's config.json (and weights), keeping the weights' sha256 honest, so the loader
    gets past the sha check to what the case is about."""
    def run(ctx: Ctx) -> None:
        version = ctx.root / MODEL
        if weights is not None:
            (version / "model.safetensors").write_bytes(weights)
        config = json.loads((version / "config.json").read_text())
        config["weights_sha256"] = hashlib.sha256((version / "model.safetensors").read_bytes()).hexdigest()
        change(config)
        (version / "config.json").write_text(json.dumps(config))
    return run


def wider_model(config: dict) -> None:
    config["model"]["hidden_dim"] = 48                   # the weights are 32 wide: a config/weights mismatch


def image_folder_at(folder: str) -> Callable[[Ctx], None]:
    """A valid image folder (<class>/<image>.png) at `folder` in the case folder."""
    def run(ctx: Ctx) -> None:
        from PIL import Image
        for i, cls in enumerate(("shirt", "shoe")):
            (ctx.dir / folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(ctx.dir / folder / cls / f"{i}.png")
    return run


image_folder = image_folder_at("imgs")


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small PNG whose header claims width x height pixels: a decompression bomb, as Pillow sees one."""
    import io
    import struct
    import zlib

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def upload_root(ctx: Ctx) -> None:
    """The shared root's files under the case's S3 prefix."""
    import boto3
    s3 = boto3.client("s3", endpoint_url=ctx.endpoint, region_name="us-east-1")
    prefix = ctx.s3_root.removeprefix(f"s3://{BUCKET}/")
    for path in sorted(p for p in ctx.root.rglob("*") if p.is_file()):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(ctx.root).as_posix()}", Body=path.read_bytes())


def s3_truncate(rel: str) -> Callable[[Ctx], None]:
    return both(truncate(rel), upload_root)


S3 = ("--root", "{s3root}", "--s3-endpoint", "{s3}")
ROOT = ("--root", "{root}")
GEN = ("generate", "--count", "10", "--no-progress")
RECON = ("reconstruct", "--dataset", "fm", "--no-progress")
TRAIN = ("train", "--epochs", "1", "--no-progress")

CASES = [
    # hostile names, where they enter
    Case("ingest-name-escapes", ("ingest", "image-folder", "imgs", "--name", "../../escaped", *ROOT), image_folder,
         "--name"),
    Case("ingest-split-escapes", ("ingest", "image-folder", "imgs", "--split", "../x", *ROOT), image_folder,
         "--split"),
    Case("ingest-name-slash", ("ingest", "image-folder", "imgs", "--name", "a/b", *ROOT), image_folder),
    Case("ingest-name-empty", ("ingest", "image-folder", "imgs", "--name", "", *ROOT), image_folder),
    Case("ingest-folder-dot", ("ingest", "image-folder", ".", *ROOT), image_folder_at("my images"), "--name",
         cwd="my images"),                           # the default name, the folder's own, is not a valid name
    Case("train-name-dotdot", (*TRAIN, "--dataset", "fm", "--name", "..", *ROOT), fragment="--name='..'"),
    Case("train-name-escapes", (*TRAIN, "--dataset", "fm", "--name", "../../escaped", *ROOT), fragment="--name="),
    Case("train-name-very-long", (*TRAIN, "--dataset", "fm", "--name", "n" * 300, *ROOT), fragment="--name="),
    Case("train-dataset-escapes", (*TRAIN, "--dataset", "../fm", *ROOT), fragment="--dataset="),
    Case("train-name-nul-from-config", (*TRAIN, "--dataset", "fm", "--config", "vaegen.toml", *ROOT),
         toml('name = "a\\u0000b"\n'), fragment="--name="),
    Case("train-run-id-escapes", (*TRAIN, "--dataset", "fm", "--workers", "1", "--run-id", "../r", *ROOT),
         fragment="--run-id="),
    Case("generate-model-escapes", (*GEN, "--model", "../../x", *ROOT), fragment="--model="),
    Case("generate-version-escapes", (*GEN, "--model", "tiny@../../x", *ROOT), fragment="--model="),
    Case("reconstruct-split-escapes", (*RECON, "--model", "tiny", "--split", "../../x", *ROOT), fragment="--split="),
    Case("reconstruct-dataset-slash", ("reconstruct", "--dataset", "a/b", "--model", "tiny", *ROOT),
         fragment="--dataset="),
    Case("evaluate-model-escapes", ("evaluate", "--model", "../tiny", "--no-progress", *ROOT), fragment="--model="),
    Case("evaluate-split-dotdot", ("evaluate", "--model", "tiny", "--split", "..", "--no-progress", *ROOT),
         fragment="--split="),
    Case("retrain-name-escapes", ("retrain", "--dataset", "fm", "--name", "../x", "--no-progress", *ROOT),
         fragment="--name="),
    Case("retrain-eval-split-escapes", ("retrain", "--dataset", "fm", "--name", "tiny", "--eval-split", "../x",
                                        "--no-progress", *ROOT)),
    Case("show-path-escapes", ("show", "{root}/outputs/../../elsewhere", *ROOT)),
    Case("show-job-id-dotdot", ("show", "..", *ROOT)),
    # corrupt and truncated files
    Case("generate-truncated-weights", (*GEN, "--model", "tiny@v0001", *ROOT),
         truncate(f"{MODEL}/model.safetensors"), "sha256"),
    Case("sample-truncated-config", ("sample", "--model", "tiny@v0001", "--out", "s.png", *ROOT),
         truncate(f"{MODEL}/config.json"), "config.json"),
    Case("sample-config-weights-mismatch", ("sample", "--model", "tiny@v0001", "--out", "s.png", *ROOT),
         edit_model_config(wider_model), "shape mismatch: dec_hidden.bias 32 in the file vs 48"),
    Case("evaluate-weights-not-safetensors", ("evaluate", "--model", "tiny@v0001", "--no-progress", *ROOT),
         edit_model_config(lambda c: None, weights=b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"), "unreadable"),
    Case("sample-truncated-champion", ("sample", "--model", "tiny", "--out", "s.png", *ROOT),
         truncate("models/tiny/champion.json"), "champion.json"),
    Case("reconstruct-truncated-manifest", (*RECON, "--model", "tiny@v0001", *ROOT),
         truncate("datasets/fm/_manifest.json"), "_manifest.json"),
    Case("train-truncated-shard", (*TRAIN, "--dataset", "fm", "--name", "t3", *ROOT),
         truncate("datasets/fm/train/*/part-00001.parquet"), "sha256"),
    Case("show-truncated-job-manifest", ("show", "samples-00aa", *ROOT),
         both(write(JOB.manifest, b'{"kind": "sam', under_root=True),
              write(JOB.success, b'{"manifest_sha256": "00"}', under_root=True)), f"{JOB.manifest} is corrupt"),
    Case("show-model-truncated-config", ("show", "tiny@v0001", *ROOT), truncate(f"{MODEL}/config.json"),
         ),
    Case("s3-sample-truncated-config", ("sample", "--model", "tiny@v0001", "--out", "s.png", *S3),
         s3_truncate(f"{MODEL}/config.json"), "config.json", s3=True),
    # wrong types and unreadable --config files
    Case("generate-config-count-string", ("generate", "--model", "tiny", "--config", "vaegen.toml", *ROOT),
         toml('count = "ten"\n'), "'count' must be an integer"),
    Case("train-config-name-int", ("train", "--config", "vaegen.toml", *ROOT), toml("name = 5\n"),
         "'name' must be a string"),
    Case("reconstruct-config-unknown-table", (*RECON, "--model", "tiny", "--config", "vaegen.toml", *ROOT),
         toml("[reconstrct]\nsplit = 'test'\n"), "is not a vaegen verb"),
    Case("retrain-config-margin-string", ("retrain", "--config", "vaegen.toml", *ROOT), toml('margin = "big"\n'),
         "'margin' must be a number"),
    Case("sample-config-is-a-directory", ("sample", "--model", "tiny", "--config", "cfgdir", *ROOT),
         lambda ctx: (ctx.dir / "cfgdir").mkdir(), "is a directory"),
    Case("train-config-dev-zero", (*TRAIN, "--dataset", "fm", "--config", "/dev/zero", *ROOT),
         fragment="is not a regular file"),
    Case("train-config-huge", (*TRAIN, "--dataset", "fm", "--config", "vaegen.toml", *ROOT),
         toml("# padding\n" * 200_000), "larger than 1 MiB"),
    Case("ls-config-missing", ("ls", "--config", "missing.toml", *ROOT), fragment="does not exist"),
    Case("generate-config-binary", ("generate", "--model", "tiny", "--config", "vaegen.toml", *ROOT),
         write("vaegen.toml", bytes(range(256))), "not valid TOML"),
    Case("config-show-bad-toml", ("config", "show", "train", "--config", "vaegen.toml", *ROOT),
         toml("epochs = \n"), "not valid TOML"),
    Case("config-show-no-verb", ("config", "show"), fragment="give the verb"),
    Case("config-show-bad-flag", ("config", "show", "generate", "--count", "many"), fragment="--count"),
    Case("submit-config-missing", ("submit", "--address", "{closed}", "--", "generate", "--model", "tiny",
                                   "--config", "missing.toml"), fragment="does not exist"),
    # resource limits
    # a root that holds a link out of itself
    Case("generate-outputs-linked-out", (*GEN, "--model", "tiny", *ROOT),
         lambda ctx: ((ctx.dir / "elsewhere").mkdir(), (ctx.root / "outputs").symlink_to(ctx.dir / "elsewhere")),
         "refusing to follow the symbolic link"),
    Case("ingest-split-linked-out", ("ingest", "image-folder", "imgs", "--name", "fm", *ROOT),
         both(image_folder, lambda ctx: ((ctx.dir / "victim" / "g-deadbeefdeadbeef").mkdir(parents=True),
                                         (ctx.root / "datasets" / "fm" / "evil").symlink_to(ctx.dir / "victim"))),
         "refusing to follow the symbolic link"),
    Case("generate-billion-shards", ("generate", "--model", "tiny", "--count", "1000000000", "--shard-size", "1",
                                     *ROOT), fragment="at most 100,000"),
    Case("generate-huge-workers", (*GEN, "--model", "tiny", "--workers", "100000", *ROOT), fragment="--workers="),
    Case("train-huge-workers", (*TRAIN, "--dataset", "fm", "--workers", "100000", *ROOT), fragment="--workers="),
    Case("sample-huge-count", ("sample", "--model", "tiny", "--count", "100000000", "--out", "s.png", *ROOT),
         fragment="--count="),
    # numbers that are not finite or out of range, refused before Ray starts
    Case("train-lr-inf", (*TRAIN, "--dataset", "fm", "--lr", "inf", *ROOT), fragment="--lr=inf must be a finite"),
    Case("train-lr-nan-in-config", (*TRAIN, "--dataset", "fm", "--config", "vaegen.toml", *ROOT),
         toml("lr = nan\n"), "--lr=nan must be a finite"),
    Case("train-cpus-per-worker-nan", (*TRAIN, "--dataset", "fm", "--workers", "1", "--cpus-per-worker", "nan",
                                       *ROOT), fragment="--cpus-per-worker=nan"),
    Case("train-gpus-per-worker-inf", (*TRAIN, "--dataset", "fm", "--workers", "1", "--gpus-per-worker", "inf",
                                       *ROOT), fragment="--gpus-per-worker=inf"),
    Case("generate-cpus-per-worker-nan", (*GEN, "--model", "tiny", "--cpus-per-worker", "nan", *ROOT),
         fragment="--cpus-per-worker=nan"),
    Case("train-huge-hidden-dim", (*TRAIN, "--dataset", "fm", "--hidden-dim", "99999999999", *ROOT),
         fragment="--hidden-dim=99999999999 must be in 1..65536"),
    Case("train-huge-latent-dim-in-config", (*TRAIN, "--dataset", "fm", "--config", "vaegen.toml", *ROOT),
         toml(f"latent_dim = {2**40}\n"), "--latent-dim="),
    Case("evaluate-huge-k", ("evaluate", "--model", "tiny", "--k", str(10**12), *ROOT), fragment="--k="),
    Case("generate-lease-ttl-word", (*GEN, "--model", "tiny", *ROOT), env=(("VAEGEN_LEASE_TTL_S", "abc"),),
         fragment="VAEGEN_LEASE_TTL_S='abc'"),
    Case("generate-lease-ttl-zero", (*GEN, "--model", "tiny", *ROOT), env=(("VAEGEN_LEASE_TTL_S", "0"),),
         fragment="VAEGEN_LEASE_TTL_S='0'"),
    Case("generate-lease-ttl-negative", (*GEN, "--model", "tiny", *ROOT), env=(("VAEGEN_LEASE_TTL_S", "-5"),),
         fragment="VAEGEN_LEASE_TTL_S='-5'"),
    Case("ingest-decompression-bomb", ("ingest", "image-folder", "imgs", *ROOT),
         both(image_folder, write("imgs/shoe/bomb.png", bomb_png())), "bomb.png"),
    # local paths that do not work
    Case("sample-out-missing-folder", ("sample", "--model", "tiny", "--out", "{dir}/missing/dir/x.png", *ROOT),
         fragment="does not exist"),
    Case("sample-out-is-a-directory", ("sample", "--model", "tiny", "--out", "{dir}", *ROOT),
         fragment="is a directory"),
    Case("sample-failure-keeps-existing-out", ("sample", "--model", "tiny", "--label", "3", "--out", "keep.png",
                                               *ROOT), write("keep.png", b"an earlier grid"), "not conditional"),
    Case("show-out-missing-folder", ("show", "tiny@v0001", "--out", "{dir}/missing/dir/x.html", *ROOT)),
    Case("ls-missing-root", ("ls", "{dir}/missing")),
    # bad URIs, missing buckets, credentials, unreachable S3
    Case("ingest-ftp-root", ("ingest", "image-folder", "imgs", "--root", "ftp://127.0.0.1/x"), image_folder,
         "unsupported storage URI scheme"),
    Case("ls-s3-no-bucket", ("ls", "s3://"), fragment="names no bucket"),
    Case("train-s3-missing-bucket", (*TRAIN, "--dataset", "fm", "--root", "s3://no-such-bucket/x",
                                     "--s3-endpoint", "{s3}"), fragment="no-such-bucket", s3=True),
    Case("ls-s3-missing-bucket", ("ls", "--root", "s3://no-such-bucket/x", "--s3-endpoint", "{s3}"),
         fragment="no-such-bucket", s3=True),
    Case("evaluate-s3-endpoint-not-http", ("evaluate", "--model", "tiny", "--root", "s3://b/x", "--s3-endpoint",
                                           "ftp://127.0.0.1:21"), fragment="--s3-endpoint="),
    Case("ingest-s3-wrong-credentials", ("ingest", "image-folder", "imgs", "--name", "x", "--root", "{s3root}",
                                         "--s3-endpoint", "{auth}"), image_folder, "credentials"),
    Case("sample-s3-wrong-credentials", ("sample", "--model", "tiny", "--root", "{s3root}", "--s3-endpoint",
                                         "{auth}"), fragment="credentials"),
    Case("ls-s3-unreachable", ("ls", "--root", "{s3root}", "--s3-endpoint", "{closed}"), fragment="127.0.0.1"),
    Case("generate-s3-unreachable", (*GEN, "--model", "tiny", "--root", "{s3root}", "--s3-endpoint", "{closed}"),
         fragment="127.0.0.1"),
    Case("submit-ftp-address", ("submit", "--address", "ftp://127.0.0.1:1", "--", "ls", *ROOT)),
    Case("submit-unreachable", ("submit", "--address", "{closed}", "--", "ls", *ROOT), fragment="cannot reach"),
]


# -- running and observing ---------------------------------------------------------------------------------------
def local_tree(top: Path) -> dict[str, tuple]:
    """Every path under `top` → ('dir',) or (size, sha256): what a command must leave as it was."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, d), top)] = ("dir",)
        for f in filenames:
            path = os.path.join(dirpath, f)
            data = Path(path).read_bytes() if not os.path.islink(path) else os.readlink(path).encode()
            tree[os.path.relpath(path, top)] = (len(data), hashlib.sha256(data).hexdigest())
    return tree


def buckets(endpoint: str) -> dict[str, tuple]:
    """Every object of every bucket on the endpoint → (size, ETag)."""
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    found = {}
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                found[f"{bucket['Name']}/{obj['Key']}"] = (obj["Size"], obj["ETag"])
    return found


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    changed: dict = field(default_factory=dict)


def diff(before: dict, after: dict) -> dict:
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def run_case(case: Case, base_root: Path, work: Path, endpoints: dict[str, str]) -> Outcome:
    top = work / case.id
    ctx = Ctx(dir=top, root=top / "root", s3_root=f"s3://{BUCKET}/adv-{uuid.uuid4().hex[:10]}", **endpoints)
    shutil.copytree(base_root, ctx.root)
    if case.setup:
        case.setup(ctx)
    values = {"root": str(ctx.root), "dir": str(top), "s3root": ctx.s3_root, "s3": ctx.endpoint,
              "auth": ctx.auth_endpoint, "closed": ctx.closed}
    argv = [arg.format(**values) for arg in case.argv]
    before_tree = local_tree(top)
    before_s3 = buckets(ctx.endpoint) if case.s3 else {}
    env = {**os.environ, "PYTHONPATH": str(REPO), **dict(case.env)}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=top / case.cwd, env=env,
                          capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    changed = diff(before_tree, local_tree(top))
    if case.s3:
        changed.update({f"s3://{k}": v for k, v in diff(before_s3, buckets(ctx.endpoint)).items()})
    return Outcome(proc.returncode, proc.stdout, proc.stderr, changed)


@pytest.fixture(scope="module")
def base_root(tmp_path_factory, small_fashion) -> Path:
    """64 training and 32 test images of Fashion-MNIST as dataset 'fm', and model tiny@v0001 (the champion)."""
    from generate_support import publish_tiny_model

    from cluster.data.datasets import ingest
    from cluster.store.registry import Registry, swap_champion
    from cluster.store.storage import open_storage
    from vae_core.config import StorageConfig
    from vae_core.data import ArrayDataset, ArraySplit
    (train_x, train_y), (test_x, test_y) = small_fashion
    root = tmp_path_factory.mktemp("adversarial-base") / "root"
    storage = open_storage(StorageConfig(root=str(root)), for_writing=True)
    dataset = ArrayDataset({"train": ArraySplit(train_x[:64], train_y[:64]),
                            "test": ArraySplit(test_x[:32], test_y[:32])}, tuple(map(str, range(10))), "fm-slice")
    ingest(storage, "fm", dataset, shard_rows=32, progress=False)
    ref = publish_tiny_model(storage, "tiny")
    assert swap_champion(Registry(storage), "tiny", {"version": "v0001"}, None) and ref == "tiny@v0001"
    return root


@pytest.fixture(scope="module")
def auth_s3_server(starts_moto):
    """A moto server that checks credentials from the first request on (it knows none of ours): what an S3
    endpoint does with wrong credentials."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the credential-checking moto server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def outcomes(request, base_root, s3_server, auth_s3_server, tmp_path_factory) -> dict[str, Future]:
    """Every selected case, run once, in parallel (a case whose setup fails fails alone)."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    endpoints = {"endpoint": s3_server, "auth_endpoint": auth_s3_server, "closed": f"http://127.0.0.1:{free_port()}"}
    work = tmp_path_factory.mktemp("adversarial")
    with ThreadPoolExecutor(PARALLEL) as pool:
        return {case.id: pool.submit(run_case, case, base_root, work, endpoints) for case in wanted}


def params():
    for case in CASES:
        marks = [pytest.mark.xfail(reason=case.needs, strict=False)] if case.needs else []
        yield pytest.param(case, id=case.id, marks=marks)


def test_the_table_covers_every_verb_and_kind_of_hostility():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    verbs = {c.argv[0] for c in CASES} | {" ".join(c.argv[:2]) for c in CASES if c.argv[0] == "config"}
    assert {"ingest", "train", "generate", "reconstruct", "evaluate", "sample", "retrain", "ls", "show",
            "config show", "submit"} <= verbs


@pytest.mark.parametrize("case", params())
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(case, outcomes):
    out = outcomes[case.id].result()
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("vaegen: error: "), out.stderr[-2000:]
    assert case.fragment in lines[0], lines[0]
    assert not out.changed, f"the command changed {sorted(out.changed)} ({lines[0]})"
