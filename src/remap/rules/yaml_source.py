"""Read YAML with pyyaml's safe loader, keeping the line and column of every node.

Errors in a rules file must point at ``file:line:col``; pyyaml's constructed objects
forget where they came from, so we compose the node tree and build plain Python values
ourselves, recording a :class:`Locations` map from path (``("rules", 2, "rename")``) to
position.

>>> data, locs = load_yaml("rules:\\n  - drop: x\\n", "r.yaml")
>>> data
{'rules': [{'drop': 'x'}]}
>>> locs.at(("rules", 0, "drop"))
'r.yaml:2:11'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import RulesError, describe_value

__all__ = ["Locations", "load_yaml", "MAX_NODES", "INT_BITS", "check_scalar"]

MAX_NODES = 100_000  # an alias bomb expands past this long before it exhausts memory
INT_BITS = 64  # integers in rules fit in int64 (or uint64): every size, index and dim torch has does


def check_scalar(value: Any) -> str | None:
    """What is wrong with a scalar of a rules document, or None: an integer that no tensor
    size, index or count can be (past 64 bits; Python would not even print one of 5000
    digits), or a string holding a lone surrogate (not a character: it cannot be printed,
    written to a report, or be part of a key read from a file).

    >>> check_scalar(2**70)
    'expected an integer of at most 64 bits, found a 71-bit integer'
    >>> print(check_scalar("a" + chr(0xD800)))
    expected text, found a string holding the lone surrogate '\\ud800' at position 1, which is not a character
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > INT_BITS:
        return f"expected an integer of at most {INT_BITS} bits, found a {value.bit_length()}-bit integer"
    if isinstance(value, str) and not _encodable(value):
        at = next(n for n, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
        return f"expected text, found a string holding the lone surrogate {ascii(value[at])} at position {at}, which is not a character"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

Path = tuple[Any, ...]


@dataclass
class Locations:
    """Positions of values and of mapping keys by path; empty for rules given as a dict."""

    filename: str = "<rules>"
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def at(self, path: Path, *, key: bool = False) -> str:
        """``file:line:col`` of the value (or key) at ``path``, else of its nearest parent."""
        table = self.keys if key else self.values
        for n in range(len(path), -1, -1):
            pos = table.get(tuple(path[:n])) or self.values.get(tuple(path[:n]))
            if pos:
                return f"{self.filename}:{pos[0]}:{pos[1]}"
        return self.filename


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, locs: Locations) -> None:
        self.locs = locs
        self.count = 0
        self.active: set[int] = set()  # the nodes being built: one seen again is a recursive alias
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RulesError(
                f"the document expands to more than {MAX_NODES} nodes (aliases?); refusing to build it",
                where=self.locs.at(path[:1], key=True),  # an alias's own marks point at its anchor
            )
        self.locs.values[path] = _mark(node)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):  # !!python/..., !!set, !!omap: nothing a rules file needs
            raise RulesError(f"unsupported YAML tag '{node.tag}'; write plain mappings and lists", where=f"{self.locs.filename}:{_fmt(node)}")
        if id(node) in self.active:
            raise RulesError("recursive alias: this node contains itself", where=f"{self.locs.filename}:{_fmt(node)}")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            where = f"{self.locs.filename}:{_fmt(key_node)}"
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise RulesError("YAML merge keys ('<<') are not supported; write the fields out", where=where)
            if not isinstance(key_node, yaml.ScalarNode):
                found = "a mapping" if isinstance(key_node, yaml.MappingNode) else "a list"
                raise RulesError(f"expected a string key, found {found}", where=where)
            key = self._scalar(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise RulesError(f"expected a string key, found {describe_value(key)}", where=where)
            if key in out:
                first = self.locs.keys[(*path, key)]
                raise RulesError(f"duplicate key {_show(key)} (first at line {first[0]})", where=where)
            self.locs.keys[(*path, key)] = _mark(key_node)
            out[key] = self.build(value_node, (*path, key))
        return out


    def _scalar(self, node: yaml.ScalarNode) -> Any:
        """A scalar's value; an explicitly tagged one that does not parse (``!!int x``) is a RulesError."""
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise  # load_yaml words it
        except Exception as exc:  # ValueError (!!int x), AttributeError (an empty !!timestamp): pyyaml's own
            if node.tag == "tag:yaml.org,2002:int" and len(node.value) > 4000:  # past Python's 4300 digits
                raise RulesError(f"expected an integer of at most {INT_BITS} bits, found one of {len(node.value)} digits",
                                 where=f"{self.locs.filename}:{_fmt(node)}") from None  # fmt: skip
            shown = node.value if len(node.value) <= 60 else node.value[:57] + "..."
            raise RulesError(
                f"invalid YAML: cannot read {shown!r} as {node.tag.rsplit(':', 1)[-1]}: {exc}",
                where=f"{self.locs.filename}:{_fmt(node)}",
            ) from None
        problem = check_scalar(value)
        if problem is not None:
            raise RulesError(problem, where=f"{self.locs.filename}:{_fmt(node)}")
        return value


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


def _show(key: str | int) -> str:
    return f"'{key}'" if isinstance(key, str) else str(key)


def _fmt(node: yaml.Node) -> str:
    line, col = _mark(node)
    return f"{line}:{col}"


def load_yaml(text: str, filename: str = "<rules>") -> tuple[Any, Locations]:
    """Parse one YAML document into plain Python values and their locations."""
    locs = Locations(filename)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None, locs
        return _Builder(locs).build(node, ()), locs
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = exc.problem or exc.context
        if exc.problem and exc.context and exc.problem.startswith("but "):
            problem = f"{exc.context}, {exc.problem}"  # "expected a single document in the stream, but found another document"
        raise RulesError(f"invalid YAML: {problem}", where=where) from None
    except yaml.YAMLError as exc:
        raise RulesError(f"invalid YAML: {exc}", where=filename) from None
    except RecursionError:
        raise RulesError("the document is nested too deeply", where=filename) from None
