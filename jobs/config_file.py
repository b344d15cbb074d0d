"""`--config FILE.toml` for every verb. Keys are the verb's own long flags without '--' (`count = 1000`,
`shard-size` or `shard_size`, `no-progress = true`); top-level keys apply to the verb being run, a `[VERB]` table
to that verb only (so one file can serve several verbs). The file's values become the parser's defaults and the
command line is parsed again, so flags given on the command line win. An unknown key, a wrong type or a value
outside the flag's choices is refused with the key named; the config dataclasses then check the values as they
check flags."""
from __future__ import annotations

import argparse
import os
import stat
import tomllib
from typing import Any

from vae_core.errors import VaegenError

from .flags import RenamedFlag, build_all

CONFIG_FLAG = "--config"
NOT_CONFIGURABLE = ("help", "config")
MAX_CONFIG_BYTES = 2**20


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Give --config to every leaf parser under `parser` (verbs, and the actions of verbs that have them)."""
    sub = _subparsers(parser)
    if sub is None:
        parser.add_argument(CONFIG_FLAG, metavar="FILE.toml", default=None,
                            help="read settings from a TOML file (keys: this verb's long flags); flags override it")
        return
    for name, child in sub.choices.items():
        if name != "config":                  # `config show` reads the --config of the command it shows
            add_config_flag(child)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), with the values of a --config file as defaults under the flags."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(argv)
    if path:
        leaf, verb = leaf_parser(parser, argv)
        if CONFIG_FLAG in leaf._option_string_actions:     # not `config show`: its command carries the flag
            apply_config(leaf, verb, path, verbs=list(_subparsers(parser).choices))
    return parser.parse_args(argv)


def _config_at(argv: list[str]) -> tuple[int, bool] | None:
    """(index of the --config token, whether its value is inline as --config=FILE), looked for up to a bare
    `--` (what follows it belongs to another command); None if there is none."""
    for i, token in enumerate(argv):
        if token == "--":
            return None
        if token == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise VaegenError(f"{CONFIG_FLAG} needs a file")
            return i, False
        if token.startswith(CONFIG_FLAG + "="):
            return i, True
    return None


def config_path(argv: list[str]) -> str | None:
    """The --config value, if argv has one."""
    at = _config_at(argv)
    if at is None:
        return None
    i, inline = at
    return argv[i].split("=", 1)[1] if inline else argv[i + 1]


def with_config_name(argv: list[str], name: str) -> list[str]:
    """argv with its --config value replaced by `name` (a job elsewhere gets the file, not this path)."""
    at = _config_at(argv)
    if at is None:
        return list(argv)
    i, inline = at
    out = list(argv)
    out[i if inline else i + 1] = f"{CONFIG_FLAG}={name}" if inline else name
    return out


def leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """The parser that will take the verb's flags (descending `jobs status`-style actions), and its name."""
    words, tokens = [], iter(argv)
    while (sub := _subparsers(parser)) is not None:
        word = next((t for t in tokens if not t.startswith("-")), None)
        if word not in sub.choices:
            raise VaegenError(f"{CONFIG_FLAG} needs a verb first (one of: {', '.join(sub.choices)})")
        parser, words = sub.choices[word], words + [word]
    return parser, " ".join(words)


def read_config(path: str) -> dict[str, Any]:
    """The file's settings. Only a regular file of at most MAX_CONFIG_BYTES is read: /dev/zero or a FIFO would
    never end."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise VaegenError(f"config file {path} is not a regular file: give a TOML file")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise VaegenError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")
    except FileNotFoundError:
        raise VaegenError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise VaegenError(f"config file {path} is a directory: give a TOML file") from None
    except OSError as e:
        raise VaegenError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise VaegenError(f"config file {path} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise VaegenError(f"config file {path} is not valid TOML: {e}") from None


def apply_config(leaf: argparse.ArgumentParser, verb: str, path: str, verbs: list[str]) -> None:
    raw = read_config(path)
    values = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for table, settings in raw.items():
        if isinstance(settings, dict):
            if table not in verbs:
                raise VaegenError(f"config file {path}: [{table}] is not a vaegen verb (verbs: {', '.join(verbs)})")
            if table == verb.split()[0]:
                values.update(settings)                  # the verb's own table wins over top-level keys
    flags = flag_actions(leaf)
    from_file = set()
    for key, value in values.items():
        action = flags.get(key.replace("_", "-"))
        if action is None:
            raise VaegenError(f"config file {path}: unknown key {key!r} for `vaegen {verb}` "
                              f"(known: {', '.join(sorted(settable_flags(leaf)))})")
        if isinstance(action, RenamedFlag):
            raise VaegenError(f"config file {path}: {key!r}: {action.message}")
        leaf.set_defaults(**{action.dest: typed_value(action, key, value, path)})
        action.required = False                          # the file supplies it
        from_file.add(action.dest)
    leaf.set_defaults(given=from_file)                   # a --preset fills only what neither file nor flags set


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name without '--' → its action, for the flags a file may set."""
    return {option[2:]: a for a in parser._actions if a.dest not in NOT_CONFIGURABLE
            for option in a.option_strings if option.startswith("--")}


def settable_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a verb takes a value for (a renamed flag only says what replaced it)."""
    return {k: a for k, a in flag_actions(parser).items() if not isinstance(a, RenamedFlag)}


def typed_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """The value the flag's dest gets, or a VaegenError naming the key."""
    where = f"config file {path}: {key!r}"
    if action.nargs == 0:                     # on/off flags (store_true/false and jobs.flags switches)
        if not isinstance(value, bool):
            raise VaegenError(f"{where} must be true or false, got {value!r}")
        return action.const if value else action.default
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise VaegenError(f"{where} must be a list, got {value!r}")
        return [_scalar(action, f"{where}[{i}]", v) for i, v in enumerate(value)]
    return _scalar(action, where, value)


def _scalar(action: argparse.Action, where: str, value: Any) -> Any:
    kind = action.type or str
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise VaegenError(f"{where} must be an integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise VaegenError(f"{where} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise VaegenError(f"{where} must be a string, got {value!r}")
    if kind not in (int, float, str):
        try:
            value = kind(value)
        except (TypeError, ValueError) as e:
            raise VaegenError(f"{where}: {e}") from None
    value = float(value) if kind is float else value
    if action.choices is not None and value not in action.choices:
        raise VaegenError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


# -- `vaegen config show` ------------------------------------------------------------------------------------
def effective_settings(parser: argparse.ArgumentParser, command: list[str]) -> tuple[str, dict[str, Any]]:
    """The settings `vaegen <command>` would run with (file, then flags, then a verb's own resolution such as a
    --preset), keyed as a config file keys them. `parser`: a fresh parser of the whole CLI."""
    argv = command[1:] if command[:1] == ["--"] else list(command)
    if not argv:
        raise VaegenError("give the verb to show, e.g. `vaegen config show generate --config gen.toml`")
    args = parse_args(parser, argv)
    leaf, verb = leaf_parser(parser, argv)
    effective = getattr(args, "effective", None)          # verbs whose flags are not the whole story (--preset)
    resolved = effective(args) if effective else {}
    build_all(args, **resolved)                            # what is shown is what the verb would accept
    settings = {}
    for key, action in settable_flags(leaf).items():
        value = resolved[action.dest] if action.dest in resolved else getattr(args, action.dest, None)
        if action.nargs == 0:                     # on/off flags (store_true/false and jobs.flags switches)
            value = value == action.const
        settings[key] = list(value) if isinstance(value, tuple) else value
    return verb, settings


def to_toml(settings: dict[str, Any]) -> str:
    """Flat key = value lines (what read_config reads back); unset (None) values as comments."""
    import json
    lines = []
    for key, value in settings.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, float):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")      # JSON strings, ints, lists are TOML too
    return "\n".join(lines) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
