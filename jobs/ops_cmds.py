"""`vaegen submit` and `vaegen jobs list|status|logs|stop`: jobs on a Ray cluster's job server."""
from __future__ import annotations

import argparse
import os
import sys

from cluster.runtime.console import terminal_stderr
from vae_core.errors import VaegenError

from .config_file import config_path, parse_args, with_config_name
from .verbs import job_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a vaegen command as a job on a Ray cluster (Ray Jobs API)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=SUBMIT_DESCRIPTION)
    add_job_server_arg(p)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job's logs and exit with its status (the default, as in `ray job submit`); "
                        "--no-wait returns once the job is submitted")
    p.add_argument("--submission-id", default="",
                   help="the job's id, as in `ray job submit`; if a job with this id exists it is reported, not "
                        "run again. Default: derived from the command (vaegen-<verb>-<hash>), so the same command "
                        "submitted twice finds the first job")
    p.add_argument("--key", default="", help="extra text in the spec's identity (e.g. a scheduled run's name), "
                                             "so a scheduled repeat is a new job")
    p.add_argument("--no-upload", dest="upload_code", action="store_false",
                   help="run the vaegen installed on the cluster instead of uploading this checkout's packages")
    p.add_argument("--pass-credentials", action="store_true",
                   help="copy AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN into the job (anyone who can read the job "
                        "table sees them; prefer credentials on the cluster itself)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the job's driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the job's driver")
    p.add_argument("command", nargs=argparse.REMAINDER, help="`--` then the vaegen verb and its flags")
    p.set_defaults(run=run_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster",
                       description="Jobs on a Ray cluster's job server.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("list", "every job, newest last"), ("status", "one job's status and error"),
                         ("logs", "one job's logs"), ("stop", "stop a running job")):
        a = actions.add_parser(action, help=text, description=text)
        add_job_server_arg(a)
        if action != "list":
            a.add_argument("submission_id", help="the id `vaegen submit` printed")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="keep following until the job ends")
    p.set_defaults(run=run_jobs)


SUBMIT_DESCRIPTION = """\
Submit `vaegen VERB ...` to a Ray cluster as a Ray job, following `ray job submit`:
the address comes from RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else --address (Ray's order: the variables win);
the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; it waits for the job and
exits with its status unless --no-wait.

Where vaegen differs from `ray job submit`, and why:
  - the submission id is derived from the command, so the same spec submitted twice (a retried CronJob pod) is
    reported, not run twice; --submission-id sets it instead
  - the command is checked against vaegen's own parser before anything is sent, and a moving --model
    (name, name@champion, name@latest) is pinned to the version it names now, so the job runs what you saw
  - with no address anywhere it uses http://127.0.0.1:8265 (a port-forwarded head) instead of looking for a
    local Ray instance
  - AWS keys never travel with the job (Ray shows a job's environment on its dashboard) unless
    --pass-credentials; AWS_ENDPOINT_URL[_S3] travels only when it is not a loopback address (127.0.0.1 here
    is not the cluster's MinIO)

Example: vaegen submit --address http://127.0.0.1:8265 -- train --root s3://bucket/vaegen --epochs 5"""


def add_job_server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the Ray head's job server, http://HEAD:8265; RAY_API_SERVER_ADDRESS or RAY_ADDRESS "
                        "override it, as in Ray's CLI (default: http://127.0.0.1:8265; token from RAY_AUTH_TOKEN, "
                        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")


def resolved_address(args: argparse.Namespace) -> str:
    from cluster.runtime.submit import job_server_address
    address, note = job_server_address(args.address)
    if note:
        print(f"vaegen: {note}", file=terminal_stderr(), flush=True)
    return address


def verb_names(parser: argparse.ArgumentParser) -> list[str]:
    return list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def check_command(command: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, bytes], ...], bool]:
    """The argv after `--`, checked against this vaegen's own parser before anything is sent, with a moving
    --model (name, @champion, @latest) pinned to its version now; the --config file it names (this machine's
    file: the job gets its bytes, and the flag just its name); and whether the spec may be de-duplicated."""
    argv = command[1:] if command[:1] == ["--"] else command
    if not argv:
        raise VaegenError("nothing to submit: give a vaegen verb after `--`")
    verbs = verb_names(job_parser())                  # every verb but submit and jobs
    if argv[0] not in verbs:
        raise VaegenError(f"unknown vaegen verb {argv[0]!r} after `--` (verbs: {', '.join(verbs)})")
    # A bad flag (or --config key) stops here, with its message. --verbose is vaegen's own global flag (jobs/cli.py
    # takes it off before parsing): the job's vaegen takes it the same way.
    parsed = parse_args(job_parser(), [a for a in argv if a != "--verbose"])
    check_job_root(argv, getattr(parsed, "root", None))
    argv, deduplicate = pin_model(list(argv), parsed)
    path = config_path(argv)
    if path is None:
        return tuple(argv), (), deduplicate
    name = os.path.basename(path)
    with open(path, "rb") as f:
        return tuple(with_config_name(argv, name)), ((name, f.read()),), deduplicate


def check_job_root(argv: list[str], root: str | None) -> None:
    """Refuse a relative --root typed after `--`: it names a folder here, and the job would read another one, under
    its working directory on the cluster."""
    typed = any(a == "--root" or a.startswith("--root=") for a in argv)
    if typed and root and "://" not in root and not os.path.isabs(root):
        raise VaegenError(f"--root={root} is relative to this machine's folder, but the job runs on the cluster: "
                          "give an s3:// root, or an absolute path every node mounts")


MODEL_READING_VERBS = ("generate", "reconstruct", "sample", "evaluate")


def pin_model(argv: list[str], parsed: argparse.Namespace) -> tuple[list[str], bool]:
    """Verbs that read a model version (generate, reconstruct, sample, evaluate) get the version the registry
    names now, read through the command's own --root/--s3-endpoint; see cluster.runtime.submit.pin_model_version."""
    spec = getattr(parsed, "model", None)
    if argv[0] not in MODEL_READING_VERBS or not isinstance(spec, str) or not hasattr(parsed, "root"):
        return argv, True
    from cluster.runtime.submit import pin_model_version
    from vae_core.config import StorageConfig

    from .flags import build
    argv, deduplicate, note = pin_model_version(argv, spec, build(StorageConfig, parsed))
    if note:
        print(f"vaegen: {note}", flush=True)
    return argv, deduplicate


def run_submit(args: argparse.Namespace) -> int:
    from cluster.runtime.submit import (
        SubmitConfig,
        connect,
        failure_line,
        final_info,
        follow_logs,
        job_exit_code,
        local_only_env,
        submit,
    )
    argv, files, deduplicate = check_command(args.command)
    cfg = SubmitConfig(address=resolved_address(args), argv=argv, files=files, wait=args.wait,
                       submission_id=args.submission_id, deduplicate=deduplicate,
                       upload_code=args.upload_code, pass_credentials=args.pass_credentials, key=args.key,
                       entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)
    for name, value in local_only_env().items():
        print(f"vaegen: not passing {name}={value} to the job: a loopback address names this machine, not the "
              "cluster's storage (give the cluster's endpoint with --s3-endpoint in the command if it needs one)",
              file=terminal_stderr(), flush=True)
    client = connect(cfg.address)
    result = submit(client, cfg)
    messages = {"submitted": f"submitted {result.submission_id}",
                "resubmitted": f"earlier attempt {result.previous} did not succeed; resubmitted as "
                               f"{result.submission_id}",
                "already-running": f"the same spec is already submitted as {result.submission_id} (running); "
                                   "not submitting it again",
                "already-succeeded": f"the same spec already ran as {result.submission_id} and succeeded; "
                                     "not running it again (use --key to make a new job)"}
    print(f"vaegen: {messages[result.status]} to {cfg.address}", flush=True)
    if not cfg.wait:
        if result.status != "already-succeeded":
            print(f"  follow: vaegen jobs logs --follow --address {cfg.address} {result.submission_id}")
        return 0
    if result.status != "already-succeeded":
        follow_logs(client, result.submission_id)
    info = final_info(client, result.submission_id)
    code = job_exit_code(info)
    if code:
        print(f"vaegen: error: job {info.submission_id} {info.status.value}: {failure_line(info)}", file=terminal_stderr())
    else:
        print(f"vaegen: job {info.submission_id} SUCCEEDED")
    return code


def run_jobs(args: argparse.Namespace) -> int:
    from cluster.runtime.submit import _call, connect, failure_line, follow_logs
    client = connect(resolved_address(args))
    if args.action == "list":
        for job in _call("listing jobs", client.list_jobs):
            print(f"{job.submission_id or job.job_id:<40} {job.status.value:<10} {job.entrypoint}")
        return 0
    sid = args.submission_id
    if args.action == "status":
        info = _call(f"job {sid}", client.get_job_info, sid)
        detail = f" ({failure_line(info)})" if info.status.value in ("FAILED", "STOPPED") else ""
        print(f"{sid} {info.status.value}{detail}")
        return 0
    if args.action == "logs":
        if args.follow:
            follow_logs(client, sid)
        else:
            sys.stdout.write(_call(f"logs of {sid}", client.get_job_logs, sid))
        return 0
    stopped = _call(f"stopping {sid}", client.stop_job, sid)
    print(f"{sid}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0
