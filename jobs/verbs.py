"""The parser of a set of verb modules (each registers its verbs' subparsers), with --config on every verb.
jobs/cli.py builds the whole command line from it, and `vaegen submit` the verbs a job may run, so that no verb
module needs to import the command line it belongs to."""
from __future__ import annotations

import argparse
from types import ModuleType

from vae_core import __version__
from vae_core.errors import VaegenError

from . import data_cmds, eval_cmds, generate_cmds, outputs_cmds, pipeline_cmd, retrain_cmd, train_cmds
from .config_file import add_config_flag

DESCRIPTION = "Train VAEs and generate synthetic images at scale, locally or on Ray."
# What a cluster job may run: every verb but those that talk to the job server themselves (ops_cmds).
JOB_VERB_MODULES = (data_cmds, train_cmds, eval_cmds, generate_cmds, pipeline_cmd, retrain_cmd, outputs_cmds)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are VaegenErrors: one line and exit 2 like every other bad input, instead of
    the usage text (and an exit from deep inside parse_args, which `vaegen submit` parses too)."""

    def parse_known_args(self, args=None, namespace=None):
        self.seen = list(args) if args is not None else []        # what this (sub)parser was given, for error()
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = self.unknown_flags()
        if unknown and not message.startswith("unrecognized arguments"):
            message = f"unknown flag {', '.join(unknown)}; {message}"       # the typo first: it explains the rest
        raise VaegenError(f"{message} (see `{self.prog} --help`)")

    def unknown_flags(self) -> list[str]:
        """The long flags given that match no flag of this parser, not even as an abbreviation."""
        given = [a.split("=", 1)[0] for a in getattr(self, "seen", []) if a.startswith("--") and a != "--"]
        return [f for f in given if not any(option.startswith(f) for option in self._option_string_actions)]


def parser_of(modules: tuple[ModuleType, ...]) -> Parser:
    parser = Parser(prog="vaegen", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"vaegen {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)      # sub-parsers are Parsers too
    for module in modules:
        module.register(sub)
    add_config_flag(parser)                  # --config FILE.toml on every verb
    # Verbs that read other vaegen commands (`config show`, `submit`) get a fresh parser of the same verbs.
    parser.set_defaults(build_parser=lambda: parser_of(modules))
    return parser


def job_parser() -> Parser:
    """The verbs a cluster job may run (what `vaegen submit` checks a command against)."""
    return parser_of(JOB_VERB_MODULES)
