"""Config dataclasses ↔ argparse. A flag is declared once, beside its field (vae_core.config.flag: name, help,
default, choices); add_flags adds a dataclass's flagged fields (nested configs included) to a parser, and build
makes the dataclass back from the parsed namespace. A field's argparse dest is the field's own name, so a
renamed flag (`--model` for ModelConfig.arch) needs no mapping code."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterator

from vae_core.errors import VaegenError

GIVEN = "given"                    # namespace attribute: the dests a flag or a --config key set


class Given(argparse.Action):
    """Stores the value and records that the user typed the flag, so that a --preset fills only the others."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, GIVEN, given_dests(namespace) | {self.dest})


class GivenSwitch(Given):
    """An on/off flag: stores `const` (the opposite of the default) when typed."""

    def __init__(self, option_strings, dest, default=False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=not default, default=default, **kwargs)


def given_dests(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, GIVEN, set()))


def count_or_word(value: Any) -> int | str:
    """The parser of a `str | int` field (--workers N|auto): a whole number as an int, any other word as itself
    (the config checks the word)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed); count_or_word for `str | int`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = count_or_word if set(args) == {str, int} else args[0]
        return kind, len(args) < len(typing.get_args(hint))
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flagged_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, str | None]]:
    """(dotted path, field, its type, its section title) for every flagged field of cls and its nested configs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(hint) and "section" in f.metadata:
            for path, inner, inner_hint, title in flagged_fields(hint, f"{prefix}{f.name}."):
                yield path, inner, inner_hint, title or f.metadata["section"]
        elif "flag" in f.metadata:
            yield prefix + f.name, f, hint, None


def add_flags(parser: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = (), required: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
              title: str | None = None, track_given: bool = False, fixed: dict[str, Any] | None = None) -> None:
    """Add cls's flagged fields (by field name: `only` these, none of `skip`) to parser, the fields of nested
    configs under their section's title and cls's own under `title`. `defaults` overrides a field's default for
    this verb; an enabled_by field (RayTrainConfig.workers) defaults to None: the optional config is off.
    track_given: record which flags were typed (for --preset). fixed: fields the verb itself sets when it builds
    cls (see build_all)."""
    defaults = defaults or {}
    enablers = _enablers(cls)
    _record_config(parser, cls, [f.name for _, f, _, _ in flagged_fields(cls)
                                 if f.name not in skip and (only is None or f.name in only)], fixed or {})
    groups: dict[str | None, Any] = {}
    for path, f, hint, section in flagged_fields(cls):
        if f.name in skip or only is not None and f.name not in only:
            continue
        if section not in groups:
            heading = section or title
            groups[section] = parser.add_argument_group(heading) if heading else parser
        meta = f.metadata
        default = defaults.get(f.name, None if f.name in enablers else _default(f))
        kwargs: dict[str, Any] = {"dest": f.name, "help": _help(meta, default, hint)}
        if hint is bool:
            kwargs.update(action=GivenSwitch if track_given else _Switch, default=default)
        else:
            kwargs.update(default=default, metavar=meta["metavar"], choices=meta["choices"],
                          action=Given if track_given else "store")
            if meta.get("parse"):
                kwargs.update(type=_parser(meta["parse"]))
            elif typing.get_origin(hint) is tuple:
                kwargs.update(type=typing.get_args(hint)[0], nargs="+")
            else:
                kwargs.update(type=hint)
        if f.name in required:
            kwargs.update(required=True, default=None, help=meta["help"])
        groups[section].add_argument(meta["flag"], **kwargs)


def _record_config(parser: argparse.ArgumentParser, cls: type, names: list[str], fixed: dict[str, Any]) -> None:
    """Note on the parser which fields of cls its flags set, for build_all (a config's flags may come in parts)."""
    configs = dict(parser.get_default("flag_configs") or {})
    known, known_fixed = configs.get(cls, ((), {}))
    configs[cls] = ((*known, *names), {**known_fixed, **fixed})
    parser.set_defaults(flag_configs=configs)


def build_all(args: argparse.Namespace, **values: Any) -> None:
    """Build every config whose flags the verb has, from args with `values` over them, so that every setting is
    checked as the verb itself would check it (a VaegenError names the flag); the configs are not kept."""
    merged = argparse.Namespace(**{**vars(args), **values})
    for cls, (names, fixed) in (getattr(args, "flag_configs", None) or {}).items():
        build(cls, merged, only=names, **fixed)


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A flag value its own parser refused: argparse prints the message as it is, a config file's check
    (jobs/config_file.py, which catches ValueError) names the key before it."""


def _parser(parse):
    """A flag's own parser as argparse's `type`: its VaegenError becomes argparse's one-line usage error."""
    def parsed(text: str):
        try:
            return parse(text)
        except VaegenError as e:
            raise BadValue(str(e)) from None
    parsed.__name__ = parse.__name__
    return parsed


class _Switch(argparse.Action):
    """store_true, or store_false for a field whose default is True: stores the opposite of the default."""

    def __init__(self, option_strings, dest, default=False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=not default, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const)


def _help(meta: dict, default: Any, hint: Any) -> str:
    if hint is bool:
        return meta["help"]
    if meta["unset"] and default in (None, "", ()):
        return f"{meta['help']} (default: {meta['unset']})"
    return f"{meta['help']} (default: %(default)s)"


def _enablers(cls: type) -> dict[str, str]:
    """enabled_by field name → the field name of its optional config, for every such config under cls."""
    found = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(hint):
            if f.metadata.get("enabled_by"):
                found[f.metadata["enabled_by"]] = f.name
            found.update(_enablers(hint))
    return found


def build(cls: type, args: argparse.Namespace, *, only: tuple[str, ...] | None = None, **fixed: Any) -> Any:
    """cls from the namespace: each flagged field from its dest (when this verb has the flag; `only` these when
    another config of the verb shares dest names), nested configs likewise, an enabled_by config only when its
    flag has a value (else None); `fixed` fields as given."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in kwargs or only is not None and f.name not in only:
            continue
        hint, optional = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(hint) and "section" in f.metadata:
            enabler = f.metadata.get("enabled_by")
            if enabler and getattr(args, enabler, None) is None:
                kwargs[f.name] = None
            else:
                kwargs[f.name] = build(hint, args)
        elif "flag" in f.metadata and hasattr(args, f.name):
            value = getattr(args, f.name)
            kwargs[f.name] = tuple(value) if typing.get_origin(hint) is tuple and value is not None else value
    return cls(**kwargs)


def changed_flags(cls: type, args: argparse.Namespace) -> list[str]:
    """The flags of cls's fields whose parsed value differs from the field's default (in field order)."""
    return [f.metadata["flag"] for _, f, _, _ in flagged_fields(cls)
            if hasattr(args, f.name) and getattr(args, f.name) != _default(f)]


def dest_paths(cls: type) -> dict[str, str]:
    """argparse dest (the field name) → dotted path under cls ("epochs" → "train.epochs")."""
    return {f.name: path for path, f, _, _ in flagged_fields(cls)}


def namespace_values(cfg: Any) -> dict[str, Any]:
    """dest → value for every flagged field of a config instance: what the parser would need to rebuild it."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and "section" in f.metadata:
            values.update(namespace_values(value))
        elif "flag" in f.metadata:
            values[f.name] = value
    return values


class RenamedFlag(argparse.Action):
    """A flag that means something else on this verb: typed (or set in a --config file), it is one line naming
    the flag to use instead."""

    def __init__(self, option_strings, dest, *, message: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise VaegenError(self.message)
