"""`vaegen`: the command line. Each verb group lives in its own module and registers its subparsers; jobs/verbs.py
builds the parser from them.

What a failure looks like to the user, one line on stderr either way:
- bad input or an impossible request (VaegenError, a flag argparse refuses) and what the machine refuses
  (OSError: a missing path, no permission, a full disk, an unreachable host) → `vaegen: error: ...`, exit 2.
  Both are the user's to fix, and the message names what to fix; a traceback would only hide it.
- anything else is a bug in vaegen → `vaegen: internal error: ...`, exit 1, so that scripts and tests can tell
  the two apart. VAEGEN_DEBUG=1 lets every exception but VaegenError through with its traceback.

What the terminal shows (cluster/runtime/console.py): vaegen's own lines and progress bars. Once a verb starts Ray,
everything Ray prints goes to a log file (under a local root, `<root>/logs/`; for an S3 root, the user's cache
folder), which the run's last line, or its error line, names. `--verbose` (on any verb, or VAEGEN_VERBOSE=1)
shows everything on the terminal instead, as Ray prints it."""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from cluster.runtime.console import ANSI, console_session, log_line, terminal_stderr
from vae_core.errors import VaegenError

from . import data_cmds, eval_cmds, generate_cmds, ops_cmds, outputs_cmds, pipeline_cmd, retrain_cmd, train_cmds
from .config_file import parse_args
from .verbs import Parser, parser_of

VERB_MODULES = (data_cmds, train_cmds, eval_cmds, generate_cmds, pipeline_cmd, retrain_cmd, ops_cmds, outputs_cmds)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
DEBUG_ENV = "VAEGEN_DEBUG"
VERBOSE_FLAG, VERBOSE_ENV = "--verbose", "VAEGEN_VERBOSE"


def build_parser() -> Parser:
    parser = parser_of(VERB_MODULES)
    # Taken off the command line before parsing (without_verbose), so that it goes anywhere before a bare `--`
    # without being a flag of each verb's own; declared here for `vaegen --help`.
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="on any verb: show everything Ray prints, instead of writing it to a log file "
                             f"(also {VERBOSE_ENV}=1)")
    return parser


def without_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """argv without --verbose (up to a bare `--`: what follows belongs to another command), and whether it was
    there or $VAEGEN_VERBOSE asks for it."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != VERBOSE_FLAG]
    verbose = len(head) < end or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    return head + argv[end:], verbose


def one_line(text: str) -> str:
    """`text` on one line, without terminal colour codes (Ray colours the tracebacks it wraps)."""
    return "; ".join(line.strip() for line in ANSI.sub("", str(text)).splitlines() if line.strip())


def os_error_line(e: OSError) -> str:
    where = " ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{e.strerror or one_line(str(e)) or type(e).__name__}{': ' + where if where else ''}"


def main(argv: list[str] | None = None, *, quiet_ray: bool = False) -> int:
    """Run one command; its exit code. quiet_ray (the `vaegen` command): Ray's output goes to a log file once a
    verb starts Ray, unless --verbose; a library caller (a test) keeps its own streams."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv, verbose = without_verbose(list(sys.argv[1:] if argv is None else argv))
    with ExitStack() as stack:
        session = None
        try:
            args = parse_args(build_parser(), argv)          # flags override a --config file
            if quiet_ray:
                session = stack.enter_context(console_session(args.verb, getattr(args, "root", None),
                                                              verbose=verbose))
            code = args.run(args)
            if session is not None and session.has_messages():
                print(f"vaegen: Ray's messages are in {session.log_path} (--verbose shows them)")
            sys.stdout.flush()                    # a closed stdout shows here, not in the interpreter's teardown
            return code
        except VaegenError as e:
            return failed(f"vaegen: error: {one_line(e)}", session, EXIT_USER_ERROR)
        except KeyboardInterrupt:
            return failed("vaegen: interrupted", session, 130)
        except OSError as e:
            if isinstance(e, BrokenPipeError) and stdout_closed():
                discard_stdout()                  # `vaegen ... | head`: the reader has what it wanted
                return 0
            if debug:
                raise
            return failed(f"vaegen: error: {one_line(os_error_line(e))}", session, EXIT_USER_ERROR)
        except Exception as e:
            if debug:
                raise
            return failed(f"vaegen: internal error: {type(e).__name__}: {one_line(e)} (a bug in vaegen; rerun "
                          f"with {DEBUG_ENV}=1 for the traceback)", session, EXIT_INTERNAL_ERROR)


def stdout_closed() -> bool:
    """Whether stdout's reader has gone (`vaegen ls | head`, `| true`): the pipe then polls as an error. A
    BrokenPipeError from anywhere else (a socket) is an ordinary OSError."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for it is dropped instead of raising again when
    the interpreter flushes it on exit. Output only ever ends vaegen's commands: the work itself is done (a
    generation committed, a model published), so the exit status stays that of the work."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno())
    os.close(devnull)


def failed(line: str, session, code: int) -> int:
    """Say why on one terminal line (naming the log, when Ray's output went to one), and put it in the log."""
    log_line(line)
    if session is not None and session.log_path is not None:
        line += f" (Ray's messages: {session.log_path})"
    print(line, file=terminal_stderr(), flush=True)
    return code


def console() -> None:
    """The `vaegen` command. A run that failed has said everything in its one line and has nothing left to clean
    up (Ray and temp folders are closed by their own context managers), so it leaves without the interpreter's
    teardown: there, under load, a native library's thread pool can abort the process (SIGABRT) after the
    error was printed, turning exit code 2 into a crash."""
    code = main(quiet_ray=True)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
