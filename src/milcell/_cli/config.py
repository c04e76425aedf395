"""Options of the ``milcell`` command, configuration files and their merge with the flags.

Every option is declared once with :func:`add_option`: the flag goes to
argparse with ``default=SUPPRESS`` (so the parsed namespace holds only the
flags typed on the command line) and its default is recorded per command.
:func:`resolve` then layers defaults, a ``--config`` file and the typed flags,
in that order, and validates the file's keys and values with the same type
converters and choices argparse uses.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milcell._utils import atomic_path
from milcell.exceptions import ConfigError

__all__ = ["NOT_SAVED", "add_option", "load_config_file", "resolve", "save_config", "set_default"]

logger = logging.getLogger("milcell")

#: Keys that describe how a run was launched, not what it computes; never saved.
NOT_SAVED = frozenset({"config", "debug", "command", "overwrite", "resume"})
#: Options without a type converter that also take a whole number (``trainable: 2``: the last 2 stages).
_NUMBER_OK = frozenset({"trainable", "device"})


def add_option(container: Any, *flags: str, default: Any = None, **kwargs: Any) -> argparse.Action:
    """Add an option (to a parser or an argument group) whose default :func:`resolve` applies."""
    help_text = kwargs.pop("help", "")
    if (
        default is not None
        and help_text != argparse.SUPPRESS
        and kwargs.get("action")
        not in (
            "store_true",
            "store_false",
        )
    ):
        help_text = f"{help_text} (default: {default})"
    action = container.add_argument(*flags, default=argparse.SUPPRESS, help=help_text, **kwargs)
    action.milcell_default = default
    return action


def set_default(parser: argparse.ArgumentParser, dest: str, value: Any) -> None:
    """Change the default :func:`resolve` applies to ``dest``."""
    for action in parser._actions:
        if action.dest == dest and hasattr(action, "milcell_default"):
            action.milcell_default = value


def _declared(parser: argparse.ArgumentParser) -> tuple[dict[str, Any], dict[str, argparse.Action]]:
    defaults: dict[str, Any] = {}
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if hasattr(action, "milcell_default") and action.dest not in defaults:
            defaults[action.dest] = action.milcell_default
            actions[action.dest] = action
    return defaults, actions


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding one mapping of option names to values.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ConfigError
        The file cannot be parsed or does not hold a mapping; the message names the file.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file '{file}' does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{file}' is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file '{file}' is not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file '{file}' is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file '{file}' must hold a mapping of option names to values, got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items()}


def _convert(action: argparse.Action, key: str, value: Any, file: str) -> Any:
    flag = action.option_strings[-1] if action.option_strings else key
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config file '{file}': {key!r} ({flag}) must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(
            f"config file '{file}': {key!r} ({flag}) must be a single value, got {type(value).__name__} "
            f"{value!r}"
        )
    converter = action.type
    if converter is None and action.choices is None and not isinstance(value, str):
        if not (isinstance(value, int) and action.dest in _NUMBER_OK):
            raise ConfigError(
                f"config file '{file}': {key!r} ({flag}) must be a string, "
                f"got {type(value).__name__} {value!r}"
            )
        value = str(value)
    if callable(converter):
        try:
            value = converter(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(
                f"config file '{file}': invalid value {value!r} for {key!r} ({flag}): {exc}"
            ) from None
    elif action.choices is not None and all(isinstance(c, str) for c in action.choices):
        value = str(value)  # YAML reads `precision: 32` as an int
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"config file '{file}': {key!r} ({flag}) must be one of {choices}, got {value!r}")
    return value


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the ``--config`` file, then the flags typed on the command line.

    Raises
    ------
    ConfigError
        A key of the file is not an option of this command (all unknown keys
        are named), or a value has the wrong type or is not an allowed choice.
    """
    defaults, actions = _declared(parser)
    given = vars(args)
    resolved = dict(defaults)
    config_path = given.get("config")
    if config_path is not None:
        raw = load_config_file(config_path)
        file_values: dict[str, Any] = {}
        unknown = []
        command = parser.prog.split()[-1]
        for key, value in raw.items():
            dest = key.replace("-", "_")
            if dest == "command":
                if value != command:
                    raise ConfigError(
                        f"config file '{config_path}' was saved by 'milcell {value}', not 'milcell {command}'"
                    )
                continue
            if dest in NOT_SAVED or dest not in defaults:
                unknown.append(key)
                continue
            file_values[dest] = _convert(actions[dest], key, value, str(config_path))
        if unknown:
            known = ", ".join(sorted(k.replace("_", "-") for k in defaults if k not in NOT_SAVED))
            raise ConfigError(
                f"config file '{config_path}': unknown key(s) {', '.join(repr(k) for k in unknown)} "
                f"for 'milcell {command}'; known keys: {known}"
            )
        resolved.update(file_values)
    resolved.update({k: v for k, v in given.items() if k in defaults or k == "config"})
    return resolved


def save_config(values: Mapping[str, Any], directory: str | Path, command: str) -> list[Path]:
    """Write the resolved options as ``config.yaml`` and ``config.json`` in ``directory``.

    Either file reruns the command: ``milcell <command> --config DIR/config.yaml``.
    """
    import yaml

    data = {"command": command}
    data.update({k: _plain(v) for k, v in values.items() if k not in NOT_SAVED})
    out = Path(directory)
    paths = []
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    paths.append(out / "config.yaml")
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    paths.append(out / "config.json")
    return paths


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
