"""Read a YAML file strictly: UTF-8, safe types only, and no key given twice in one mapping.

Every failure is a ParamsError naming the file and, for bad YAML, the line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

import yaml

from critical_weights.config.rules import name
from critical_weights.core.errors import ParamsError, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {name(key)} appears twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.1 reads `2:4` as the base-60 integer 124. YAML 1.2, which DVC writes params.yaml
# with (`dvc exp run -S`), has no base 60 and leaves `2:4` a string, unquoted. Read such
# scalars as 1.2 does, so a structure like 2:4 survives an experiment: the int and float
# resolvers below are PyYAML's own without their base-60 forms.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context} at line {mark.line + 1}, column {mark.column + 1}"
    return first_line(err)


def read_yaml(path: Path) -> Any:
    """The parsed content of `path` (None when the file holds no document)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ParamsError([f"{path}: cannot be read ({err.strerror})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError([f"{path}: is not UTF-8 text (bad byte at offset {err.start})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: is not valid YAML ({_yaml_problem(err)})"]) from None
    except RecursionError:
        raise ParamsError([f"{path}: is nested too deeply to be params"]) from None
