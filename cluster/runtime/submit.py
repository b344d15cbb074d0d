"""`vaegen submit` / `vaegen jobs`: vaegen commands as Ray jobs, through Ray's Job Submission SDK.

The submission id is derived from the job spec (the vaegen argv plus an optional key), so submitting the same
spec twice finds the first job instead of starting a second one. Only a spec whose attempts all failed or were
stopped is submitted again, as the next attempt (<id>-r2, -r3, ...). A --model that moves (a bare name,
name@champion, name@latest) is pinned to the version it names at submission, so the spec says what will run:
once the champion changes, the same command is a new job. When the registry cannot be read from the submitting
machine, such a spec is not de-duplicated at all (an argv match would not mean the same model).

Credentials never travel in the job spec by default: Ray shows a job's runtime_env to anyone who can read the
dashboard, so the cluster gets keys from its own environment (a Kubernetes Secret). Only non-secret storage
settings (endpoint, region) are passed through, and an endpoint on a loopback address (this machine's MinIO behind
a port-forward) is not: inside the cluster it would name the pod itself. --pass-credentials is an explicit opt-in.

Where the job server is and how to authenticate follow `ray job submit`: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS,
override --address (Ray's order: the SDK applies it whatever address it is given), and the token is read from the
documented places (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token)."""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import shlex
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from vae_core.config import StorageConfig
from vae_core.errors import VaegenError
from vae_core.names import check_name

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PACKAGES = ("vae_core", "cluster", "jobs")
# Not AWS_EC2_METADATA_DISABLED: vaegen sets it locally, but on AWS nodes the metadata service IS the credential.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")      # Ray's order: the first set one wins


def job_server_address(flag: str | None, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(the job server address, a line for the user when the environment overrode --address), in Ray's order:
    RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then --address, then http://127.0.0.1:8265. Ray's SDK applies the
    same override to whatever address it is given, so resolving it here keeps the line we print true."""
    environ = os.environ if environ is None else environ
    for name in ADDRESS_ENV:
        if environ.get(name):
            value = environ[name]
            note = f"{name}={value} overrides --address {flag} (as in `ray job submit`)" if flag and flag != value \
                else ""
            return value, note
    return flag or DEFAULT_ADDRESS, ""


@dataclass(frozen=True, kw_only=True)
class SubmitConfig:
    address: str                     # the head's job server, http://HEAD:8265 (or any address Ray's SDK resolves)
    argv: tuple[str, ...]            # the vaegen verb and its flags, as after `--`
    files: tuple[tuple[str, bytes], ...] = ()   # (name, bytes) the job finds in its working directory (--config)
    wait: bool = True                # follow the logs, exit with the job's status (`ray job submit` waits too)
    submission_id: str = ""          # the job's id as given (--submission-id); else derived from the spec
    upload_code: bool = True         # ship this checkout's packages (py_modules); else use the image's vaegen
    pass_credentials: bool = False   # copy AWS keys from this environment into the job (visible in Ray's job table)
    key: str = ""                    # extra text in the spec hash, e.g. a CronJob run's name: one job per run
    deduplicate: bool = True         # False: a new job whatever ran before (the spec's model could not be pinned)
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0

    def __post_init__(self) -> None:
        scheme = self.address.split("://", 1)[0] if "://" in self.address else ""
        if not self.address or any(c.isspace() for c in self.address) or scheme not in ("", "http", "https", "ray"):
            raise VaegenError(f"--address={self.address!r} must be the job server's http(s)://HOST:8265 URL (or an "
                              "address Ray resolves to it: ray://HOST:10001, HOST:6379, auto)")
        if self.submission_id:
            check_name(self.submission_id, "--submission-id")
        if not self.argv:
            raise VaegenError("nothing to submit: give a vaegen verb after `--`, e.g. "
                              "`vaegen submit --address URL -- train --dataset fashion-mnist`")


@dataclass(frozen=True)
class Submission:
    submission_id: str
    status: str                      # what happened: submitted | already-running | already-succeeded | resubmitted
    previous: str | None = None      # the attempt found before, if any


# -- the job spec ------------------------------------------------------------------------------------------
def spec_digest(argv: tuple[str, ...], key: str = "", files: tuple[tuple[str, bytes], ...] = ()) -> str:
    """The spec: argv, key, and the content of shipped files (an edited --config file is a new spec)."""
    spec: dict = {"argv": list(argv), "key": key}
    if files:
        spec["files"] = {name: hashlib.sha256(body).hexdigest() for name, body in files}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def base_submission_id(argv: tuple[str, ...], key: str = "", files: tuple[tuple[str, bytes], ...] = ()) -> str:
    return f"vaegen-{argv[0]}-{spec_digest(argv, key, files)[:12]}"


def attempt_number(base: str, submission_id: str) -> int | None:
    if submission_id == base:
        return 1
    head, _, n = submission_id.rpartition("-r")
    return int(n) if head == base and n.isdigit() else None


def entrypoint(argv: tuple[str, ...]) -> str:
    """`python -m jobs.cli ...` works with uploaded py_modules and with an installed vaegen alike."""
    return "python -m jobs.cli " + shlex.join(argv)


def is_loopback_url(url: str) -> bool:
    """http://127.0.0.1:9000, http://localhost:9000, http://[::1]:9000: this machine, wherever it is read."""
    host = (urlsplit(url if "://" in url else f"//{url}").hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_only_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The endpoint variables that name this machine (a port-forwarded MinIO): never sent to the cluster."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in ENDPOINT_ENV if environ.get(k) and is_loopback_url(environ[k])}


def job_env(pass_credentials: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    names = STORAGE_ENV + (CREDENTIAL_ENV if pass_credentials else ())
    local = local_only_env(environ)
    env = {k: environ[k] for k in names if environ.get(k) and k not in local}
    if pass_credentials and not all(env.get(k) for k in CREDENTIAL_ENV[:2]):
        raise VaegenError("--pass-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not both set "
                          "in this environment")
    return env


def runtime_env(cfg: SubmitConfig, working_dir: str | None = None) -> dict:
    env: dict = {"env_vars": job_env(cfg.pass_credentials)}
    if cfg.upload_code:
        root = Path(__file__).resolve().parents[2]         # the checkout: cluster/runtime/submit.py
        env["py_modules"] = [str(root / p) for p in PACKAGES]
    if working_dir:
        env["working_dir"] = working_dir
    return env


MOVING_VERSIONS = ("", "latest", "champion")      # what may follow '@' and name another version tomorrow


def pin_model_version(argv: list[str], spec: str, storage: StorageConfig) -> tuple[list[str], bool, str]:
    """(argv with --model pinned to the concrete version `spec` names now, whether the spec may be de-duplicated,
    a line for the user). A malformed spec is refused here, before anything is sent."""
    from cluster.store.registry import Registry, parse_model_spec
    from cluster.store.storage import Storage
    _, want = parse_model_spec(spec)
    try:
        pinned = str(Registry(Storage(storage)).resolve(spec))
    except VaegenError as e:
        if want not in MOVING_VERSIONS:
            return argv, True, ""                 # already a fixed version: the argv says what will run
        return argv, False, (f"cannot resolve --model {spec} from this machine ({e}); submitting without "
                             "de-duplication")
    note = f"--model {spec} is {pinned} now; submitting that version" if pinned != spec else ""
    return with_model(argv, pinned), True, note


def with_model(argv: list[str], spec: str) -> list[str]:
    """argv with its --model value replaced by `spec` (appended when the value came from a --config file:
    the last --model wins)."""
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--":
            break
        if token == "--model" and i + 1 < len(out):
            out[i + 1] = spec
            return out
        if token.startswith("--model="):
            out[i] = f"--model={spec}"
            return out
    return out + ["--model", spec]


# -- the client ----------------------------------------------------------------------------------------------
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token(environ: dict[str, str] | None = None) -> str | None:
    """The Ray token where Ray's token-authentication docs say it is, in their order: RAY_AUTH_TOKEN (non-empty),
    else the file RAY_AUTH_TOKEN_PATH names (unreadable or empty is an error, as in Ray: no silent fallback),
    else ~/.ray/auth_token if it exists. None when there is none. The token never appears in a message."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip()
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise VaegenError(f"{TOKEN_PATH_ENV}={path} cannot be read ({type(e).__name__}); point it at the "
                              "cluster's token file or unset it") from None
        if not token:
            raise VaegenError(f"{TOKEN_PATH_ENV}={path} is empty; point it at the cluster's token file or unset it")
        return token
    path = default_token_path()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise VaegenError(f"{path} cannot be read ({type(e).__name__}); fix its permissions or set "
                          f"{TOKEN_ENV}") from None


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Ray 2.60 clusters check a bearer token unless started with RAY_AUTH_MODE=disabled; the SDK itself sends one
    only when this process is in token mode, so vaegen sends the token it finds. RAY_AUTH_MODE=disabled sends
    none (the token is a secret: not for a server that did not ask for it)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = find_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str) -> "JobSubmissionClient":
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from cluster.runtime.console import capture
    capture()                        # Ray's notices (token, address) go to the verb's log, as for every Ray verb
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as e:
        refused = "failed" in str(e).split(":", 1)[0]
        problem = "refused our token" if refused else "needs a token and none was found"
        raise VaegenError(f"the Ray cluster at {address} {problem}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or "
                          "copy the head's ~/.ray/auth_token (`ray get-auth-token` on the head)") from None
    except (ConnectionError, OSError) as e:
        raise VaegenError(f"cannot reach the Ray job server at {address} ({type(e).__name__}); is the head up "
                          "with its dashboard on that port? (e.g. kubectl port-forward svc/vaegen-head-svc 8265)"
                          ) from None
    except RuntimeError as e:
        raise VaegenError(f"{address} is not a Ray job server: {str(e).splitlines()[0]}") from None


def _call(what: str, fn, *args, **kwargs):
    """One SDK call with its RuntimeError (HTTP failure) turned into a one-line VaegenError."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise VaegenError(f"{what}: {str(e).strip().splitlines()[0]}") from None


def attempts(client: "JobSubmissionClient", base: str) -> list:
    """Earlier jobs of this spec, oldest attempt first."""
    found = [(n, j) for j in _call("listing jobs", client.list_jobs)
             if j.submission_id and (n := attempt_number(base, j.submission_id)) is not None]
    return [j for _, j in sorted(found, key=lambda t: t[0])]


def identity_key(cfg: SubmitConfig) -> str:
    """The key that goes into the spec hash: --key, plus a fresh nonce when the spec must not be de-duplicated."""
    return cfg.key if cfg.deduplicate else f"{cfg.key}\nnot-deduplicated-{uuid.uuid4().hex}"


def submit(client: "JobSubmissionClient", cfg: SubmitConfig) -> Submission:
    key = identity_key(cfg)
    if cfg.submission_id:
        earlier = [j for j in _call("listing jobs", client.list_jobs) if j.submission_id == cfg.submission_id]
        base = cfg.submission_id
        if earlier and (earlier[0].metadata or {}).get("vaegen_spec") != spec_digest(cfg.argv, key, cfg.files):
            raise VaegenError(f"--submission-id {base} is taken by another job on this cluster (another command "
                              "or key); give another id")
    else:
        base = base_submission_id(cfg.argv, key, cfg.files)
        earlier = attempts(client, base)
    for job in earlier:
        if str(job.status.value) in ACTIVE:
            return Submission(job.submission_id, "already-running", job.submission_id)
        if str(job.status.value) == "SUCCEEDED":
            return Submission(job.submission_id, "already-succeeded", job.submission_id)
    if earlier and cfg.submission_id:       # Ray never reuses an id; nor do we rename one the user chose
        raise VaegenError(f"job {cfg.submission_id} already ran and ended {earlier[0].status.value}; give another "
                          "--submission-id, or leave it out to get the spec's next attempt")
    submission_id = base if not earlier else f"{base}-r{len(earlier) + 1}"
    try:
        with tempfile.TemporaryDirectory(prefix="vaegen-submit-") as folder:    # uploaded by submit_job
            for name, body in cfg.files:
                Path(folder, name).write_bytes(body)
            client.submit_job(entrypoint=entrypoint(cfg.argv), submission_id=submission_id,
                              runtime_env=runtime_env(cfg, folder if cfg.files else None),
                              metadata={"vaegen_spec": spec_digest(cfg.argv, key, cfg.files),
                                        "vaegen_key": cfg.key},
                              entrypoint_num_cpus=cfg.entrypoint_num_cpus or None,
                              entrypoint_num_gpus=cfg.entrypoint_num_gpus or None)
    except RuntimeError as e:
        if "already exists" in str(e):          # a concurrent submit of the same spec won the id
            return Submission(submission_id, "already-running", submission_id)
        raise VaegenError(f"submitting {submission_id}: {str(e).strip().splitlines()[0]}") from None
    return Submission(submission_id, "resubmitted" if earlier else "submitted",
                      earlier[-1].submission_id if earlier else None)


# -- following a job ---------------------------------------------------------------------------------------
def follow_logs(client: "JobSubmissionClient", submission_id: str, out=None) -> None:
    out = out or sys.stdout              # looked up now: the console may have routed sys.stdout since import
    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
    try:
        asyncio.run(tail())
    except RuntimeError:
        pass                                    # the stream broke: the final status is read separately


def final_info(client: "JobSubmissionClient", submission_id: str, poll_s: float = 1.0):
    import time
    while True:
        info = _call(f"reading job {submission_id}", client.get_job_info, submission_id)
        if str(info.status.value) in TERMINAL:
            return info
        time.sleep(poll_s)


def job_exit_code(info) -> int:
    """0 for SUCCEEDED; else the driver's own exit code when Ray knows it (vaegen's bad input is 2), else 1."""
    if str(info.status.value) == "SUCCEEDED":
        return 0
    return info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1


def failure_line(info) -> str:
    """The job's error in one line: Ray's first message line plus the last line the job printed."""
    lines = [ln for ln in (info.message or "").splitlines() if ln.strip()]
    if not lines:
        return f"job {info.submission_id} {info.status.value}"
    head = lines[0].split(", last available logs")[0]
    return f"{head}: {lines[-1].strip()}" if len(lines) > 1 else head
