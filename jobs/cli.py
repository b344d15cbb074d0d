"""`vaegen`: the command line. Each verb group lives in its own module and registers its subparser here."""
from __future__ import annotations

import argparse
import sys

from vae_core import __version__
from vae_core.errors import VaegenError

from . import data_cmds, eval_cmds, pipeline_cmd, train_cmds

VERB_MODULES = (data_cmds, train_cmds, eval_cmds, pipeline_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaegen", description="Train VAEs and generate synthetic images at scale, locally or on Ray.")
    parser.add_argument("--version", action="version", version=f"vaegen {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in VERB_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VaegenError as e:
        print(f"vaegen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
