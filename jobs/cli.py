"""`vaegen`: the command line. Each verb group lives in its own module and registers its subparsers; jobs/verbs.py
builds the parser from them.

What a failure looks like to the user, one line on stderr either way:
- bad input or an impossible request (VaegenError, a flag argparse refuses) and what the machine refuses
  (OSError: a missing path, no permission, a full disk, an unreachable host) → `vaegen: error: ...`, exit 2.
  Both are the user's to fix, and the message names what to fix; a traceback would only hide it.
- anything else is a bug in vaegen → `vaegen: internal error: ...`, exit 1, so that scripts and tests can tell
  the two apart. VAEGEN_DEBUG=1 lets every exception but VaegenError through with its traceback."""
from __future__ import annotations

import os
import sys

from vae_core.errors import VaegenError

from . import data_cmds, eval_cmds, generate_cmds, ops_cmds, outputs_cmds, pipeline_cmd, retrain_cmd, train_cmds
from .config_file import parse_args
from .verbs import Parser, parser_of

VERB_MODULES = (data_cmds, train_cmds, eval_cmds, generate_cmds, pipeline_cmd, retrain_cmd, ops_cmds, outputs_cmds)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
DEBUG_ENV = "VAEGEN_DEBUG"


def build_parser() -> Parser:
    return parser_of(VERB_MODULES)


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def os_error_line(e: OSError) -> str:
    where = " ".join(repr(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{e.strerror or one_line(str(e)) or type(e).__name__}{': ' + where if where else ''}"


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = parse_args(build_parser(), argv)          # flags override a --config file
        return args.run(args)
    except VaegenError as e:
        print(f"vaegen: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vaegen: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        print(f"vaegen: error: {one_line(os_error_line(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if debug:
            raise
        print(f"vaegen: internal error: {type(e).__name__}: {one_line(e)} (a bug in vaegen; rerun with "
              f"{DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def console() -> None:
    """The `vaegen` command. A run that failed has said everything in its one line and has nothing left to clean
    up (Ray and temp folders are closed by their own context managers), so it leaves without the interpreter's
    teardown: there, under load, a native library's thread pool can abort the process (SIGABRT) after the
    error was printed, turning exit code 2 into a crash."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
