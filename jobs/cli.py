"""`vaegen`: the command line. Each verb group lives in its own module and registers its subparser here."""
from __future__ import annotations

import argparse
import sys

from vae_core import __version__
from vae_core.errors import VaegenError

from . import data_cmds, eval_cmds, generate_cmds, ops_cmds, outputs_cmds, pipeline_cmd, train_cmds
from .config_file import add_config_flag, parse_args

VERB_MODULES = (data_cmds, train_cmds, eval_cmds, generate_cmds, pipeline_cmd, ops_cmds, outputs_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaegen", description="Train VAEs and generate synthetic images at scale, locally or on Ray.")
    parser.add_argument("--version", action="version", version=f"vaegen {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in VERB_MODULES:
        module.register(sub)
    add_config_flag(parser)                  # --config FILE.toml on every verb
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(build_parser(), argv)          # flags override a --config file
        return args.run(args)
    except VaegenError as e:
        print(f"vaegen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
