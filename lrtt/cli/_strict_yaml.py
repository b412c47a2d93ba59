"""YAML read strictly, for config files and ``--set`` values: a key given twice in one mapping
is an error naming both places (YAML itself would keep the last silently), and every YAML
failure is one-line :class:`~lrtt.cli._schema.ConfigError` naming the line and column."""

from __future__ import annotations

from typing import Any

import yaml

from lrtt.cli._schema import ConfigError
from lrtt.cli._show import SHOW_LIMIT, show, show_key

class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice (``first`` and ``second`` are the keys' marks)."""

    def __init__(self, path: str, first: yaml.Mark, second: yaml.Mark):
        super().__init__(path)
        self.path, self.first, self.second = path, first, second

    def describe(self, *, columns: bool = False) -> str:
        """One line: the key and where it is given twice (lines in a file, columns in an override)."""
        if columns:
            where = f"at columns {self.first.column + 1} and {self.second.column + 1} of the value"
        else:
            where = f"at line {self.first.line + 1} and line {self.second.line + 1}"
        return f"{show_key(self.path)} is given twice, {where}; keep one"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a mapping giving a key twice is an error
    (:class:`_DuplicateKey`, with both places) where YAML keeps the last value silently, and an
    int too long for Python is a YAML error at its place rather than a bare ``ValueError``."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._check_keys(node, "", set())
        return self.construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        """Walk the composed document (each node once: aliases share nodes) for repeated keys."""
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given here may override
                    self._check_keys(value_node, path, seen)
                    continue
                if isinstance(key_node, yaml.ScalarNode):
                    key = self.construct_object(key_node)
                    dotted = f"{path}.{key}" if path else str(key)
                else:  # a list or mapping as a key: never equal to another one here
                    key, dotted = id(key_node), f"{path}.<complex key>"
                if key in first:
                    raise _DuplicateKey(dotted, first[key], key_node.start_mark)
                first[key] = key_node.start_mark
                self._check_keys(value_node, dotted, seen)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"the integer {show(node.value)} has too many digits for Python (quote it if it is text)",
                node.start_mark,
            ) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _one_line(err: yaml.YAMLError, *, columns: bool = False) -> str:
    """YAML's multi-line error as one line: the problem at line L, column C (and its context)."""
    if isinstance(err, _DuplicateKey):
        return err.describe(columns=columns)

    def at(mark) -> str:
        if columns:
            return f"at column {mark.column + 1} of the value"
        return f"at line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(err, yaml.MarkedYAMLError):
        problem, mark = (err.problem, err.problem_mark) if err.problem else (err.context, err.context_mark)
        text = f"{problem} {at(mark)}" if mark else str(problem)
        if err.problem and err.context:
            text += f" ({err.context}{' ' + at(err.context_mark) if err.context_mark else ''})"
        if err.note:
            text += f"; {err.note}"
    else:
        text = str(err)
    text = " ".join(text.split())
    return text if len(text) <= 4 * SHOW_LIMIT else text[: 4 * SHOW_LIMIT] + "…"


def load_yaml(text: str, where: str, *, columns: bool = False, fix: str = "") -> Any:
    """``text`` parsed by :class:`_StrictLoader`; every YAML failure a one-line ConfigError
    (``columns``: with the column of the error; ``fix``: the way out, appended)."""
    loader = _StrictLoader(text)
    fix = f"; {fix}" if fix else ""
    try:
        return loader.get_single_data()
    except _DuplicateKey as err:
        raise ConfigError(f"{where}: {err.describe(columns=columns)}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(err, columns=columns)}{fix}.") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; a config is a few levels of mappings.") from None
    finally:
        loader.dispose()

