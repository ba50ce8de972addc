"""The configuration file as read: strict YAML with lines, sections, and secret references.

The reading half of gateway/config.py (which holds the shape and its rules), and the only other
module that reads the environment or secret files. It is there so that a file is used only as
it was written:

- a key written twice in one mapping, at any depth, is an error naming both lines (PyYAML's
  own loaders silently keep the last one: a second `tenants:` block would drop the first);
- every error names the file, the line and the YAML path, as
  `gw.yaml:23: tenants.acme.limits.tokens.per_day: must be at least 1, got 0`; the line is the
  offending value's, or its parent mapping's when the value is missing;
- a key no reader asked for is an error that suggests the closest known one;
- an error never shows what a `${...}` reference resolved to, nor a URL's credentials.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

SECRET_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MERGE = "tag:yaml.org,2002:merge"  # `<<: *anchor`: merged keys may be overridden


@dataclass(frozen=True, slots=True)
class Place:
    """Where a value is: its YAML path (`tenants.acme.keys[0].sha256`) and its line."""

    path: str  # "" for the document itself
    line: int

    def key(self, key: object, line: int) -> Place:
        return Place(f"{self.path}.{key}" if self.path else str(key), line)

    def item(self, index: int, line: int) -> Place:
        return Place(f"{self.path}[{index}]", line)


class Problem(Exception):
    """A mistake at a place in the file; `parse_config` turns it into the one ConfigError."""

    def __init__(self, place: Place, problem: str) -> None:
        super().__init__(f"{place.path}: {problem}" if place.path else problem)
        self.place = place

    def message(self, source: str) -> str:
        return f"{source}:{self.place.line}: {self}"


# --- strict YAML -------------------------------------------------------------------------


class _Mapping(dict[Any, Any]):
    """A YAML mapping that knows the line of each of its values."""

    __slots__ = ("line", "lines")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[Any, int] = {}


class _Sequence(list[Any]):
    """A YAML sequence that knows the line of each of its items."""

    __slots__ = ("line", "lines")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: list[int] = []


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _value_line(key_node: yaml.Node, value_node: yaml.Node) -> int:
    """A scalar's own line; a mapping's or list's is its key's (a block one starts below)."""
    return _line(key_node) if isinstance(value_node, yaml.CollectionNode) else _line(value_node)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping and keeps every line."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicates(node, Place("", _line(node)), set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: yaml.Node, place: Place, seen: set[int]) -> None:
        # On the nodes as written, before `<<` merges are flattened into them (a merged key
        # that the mapping overrides is no duplicate); an aliased node is checked once.
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_duplicates(item, place.item(index, _line(item)), seen)
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[Hashable, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self._refuse_duplicates(value_node, place, seen)
                continue
            key: Hashable = "?"  # a mapping or list as a key: refused when it is constructed
            line = _line(key_node)
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)  # scalars are hashable
                if key in first:
                    at = f", at lines {first[key]} and" if first[key] != line else " on line"
                    raise Problem(place.key(key, line), f"defined twice{at} {line}")
                first[key] = line
            value_place = place.key(key, _value_line(key_node, value_node))
            self._refuse_duplicates(value_node, value_place, seen)

    def _mapping(self, node: yaml.MappingNode) -> Iterator[_Mapping]:
        data = _Mapping(_line(node))
        yield data
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found unhashable key",
                    key_node.start_mark,
                )
            data[key] = self.construct_object(value_node)
            data.lines[key] = _value_line(key_node, value_node)

    def _sequence(self, node: yaml.SequenceNode) -> Iterator[_Sequence]:
        data = _Sequence(_line(node))
        yield data
        for item in node.value:
            data.append(self.construct_object(item))
            data.lines.append(_line(item))


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _StrictLoader._mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:seq", _StrictLoader._sequence)


def read_yaml(text: str) -> Section:
    """The document, as the section all others are read from; raises Problem. A syntax
    error is reported by its line and PyYAML's description, never with a snippet of the file
    (a mistaken line may hold a key)."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  # SafeLoader's subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "unreadable"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise Problem(Place("", line), f"not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:  # a character YAML does not allow
        position = getattr(exc, "position", 0)
        line = text.count("\n", 0, position) + 1
        reason = getattr(exc, "reason", "unreadable text")
        raise Problem(Place("", line), f"not valid YAML: {reason}") from None
    return Section(Place("", document.line if isinstance(document, _Mapping) else 1), document)


# --- sections ----------------------------------------------------------------------------


class Section:
    """One YAML mapping being read. The keys its reader asks about (get, has, or any typed
    reader) are its known keys; any other key is an error, with the closest known one
    suggested, when the reader calls `done()`."""

    def __init__(self, place: Place, raw: object) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise Problem(place, f"expected a mapping, got {kind(raw)}")
        self.place = place
        self.raw: dict[Any, Any] = raw
        self._lines: dict[Any, int] = raw.lines if isinstance(raw, _Mapping) else {}
        self._known: set[str] = set()

    def at(self, key: object) -> Place:
        """The key's value's place; its line is this mapping's while the key is missing."""
        return self.place.key(key, self._lines.get(key, self.place.line))

    def get(self, key: str) -> object:
        self._known.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        self._known.add(key)
        return key in self.raw

    def section(self, key: str) -> Section:
        return Section(self.at(key), self.get(key))

    def entries(self, key: str) -> list[tuple[str, Section]]:
        """A mapping of names (tenants, agents) to their own sections."""
        raw = self.get(key)
        if raw is None:
            return []
        place = self.at(key)
        inner = Section(place, raw)
        return [(str(name), Section(inner.at(name), value)) for name, value in inner.raw.items()]

    def many(self, key: str) -> list[tuple[Place, object]]:
        """A list's items with their places; a single value stands for a list of one."""
        raw = self.get(key)
        if raw is None:
            return []
        place = self.at(key)
        if not isinstance(raw, list):
            return [(place, raw)]
        lines = raw.lines if isinstance(raw, _Sequence) else []
        return [
            (place.item(i, lines[i] if i < len(lines) else place.line), value)
            for i, value in enumerate(raw)
        ]

    def quoted(self, key: str) -> str:
        """The value as an error may show it: as written (never what a reference resolved
        to), with a URL's credentials masked."""
        return quoted(self.raw.get(key))

    def text(
        self, key: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None
    ) -> str:
        value = self.get(key)
        if value is None:
            if default is None:
                raise self.missing(key)
            return default
        if not isinstance(value, str):
            raise Problem(self.at(key), f"expected a string, got {kind(value)}")
        value = resolve(self.at(key), value)
        if pattern is not None and not pattern.fullmatch(value):
            raise Problem(self.at(key), f"{self.quoted(key)} does not match {pattern.pattern}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            raise Problem(
                self.at(key), f"expected one of {', '.join(choices)}, got {self.quoted(key)}"
            )
        return value

    def whole(self, key: str, default: int | None, *, minimum: int = 0) -> Any:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise Problem(self.at(key), f"expected a whole number, got {kind(value)}")
        if value < minimum:
            raise Problem(self.at(key), f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Problem(self.at(key), f"expected a number of seconds, got {kind(value)}")
        if positive and value <= 0:
            raise Problem(self.at(key), f"must be greater than 0, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Problem(self.at(key), f"expected true or false, got {kind(value)}")
        return value

    def secret(self, key: str) -> str | None:
        """A secret's value, which must come from a reference (never written inline)."""
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise Problem(self.at(key), f"expected a string, got {kind(value)}")
        if not SECRET_REF.search(value):
            raise Problem(
                self.at(key),
                "secrets are never written inline; reference one as ${ENV_NAME} "
                "or ${file:/path/to/secret}",
            )
        return resolve(self.at(key), value)

    def missing(self, key: str, problem: str = "is required") -> Problem:
        """A required key is missing: reported as the misspelling of it, if the mapping has
        a key no reader asked for that is close to it (`sha265`), else as `problem`."""
        if key not in self.raw:
            unasked = {str(k): k for k in self.raw if str(k) not in self._known}
            for close in difflib.get_close_matches(key, list(unasked), n=1):
                return Problem(self.at(unasked[close]), f"unknown key; did you mean {key}?")
        return Problem(self.at(key), problem)

    def done(self) -> None:
        """Every key the reader did not ask for is an error, suggesting the closest known."""
        for key in self.raw:
            if str(key) in self._known:
                continue
            close = difflib.get_close_matches(str(key), sorted(self._known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise Problem(self.at(key), f"unknown key{hint}")


def kind(value: object) -> str:
    if value is None:
        return "nothing"
    for type_, name in ((bool, "true/false"), (dict, "a mapping"), (list, "a list")):
        if isinstance(value, type_):
            return name
    return "a string" if isinstance(value, str) else type(value).__name__


def resolve(place: Place, written: str) -> str:
    """`written` with each `${NAME}` (environment) and `${file:/path}` (file, trimmed)
    reference replaced by its value; one that is missing or empty is a Problem."""

    def one(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("file:"):
            file = ref.removeprefix("file:")
            try:
                value = Path(file).read_text().strip()
            except OSError as exc:
                raise Problem(place, f"cannot read secret file {file}: {exc.strerror}") from None
            if not value:
                raise Problem(place, f"secret file {file} is empty")
            return value
        if not _ENV_NAME.fullmatch(ref):
            raise Problem(place, f"${{{ref}}} is neither ${{ENV_NAME}} nor ${{file:/path}}")
        env = os.environ.get(ref)
        if env is None:
            raise Problem(place, f"environment variable {ref} is not set")
        if not env:
            raise Problem(place, f"environment variable {ref} is set but empty")
        return env

    return SECRET_REF.sub(one, written)


def quoted(written: object) -> str:
    """A value as written, for an error: `'text'`, or `the value of ${NAME}` where it holds a
    reference (what that resolved to is never shown); a URL's credentials masked."""
    if not isinstance(written, str):
        return repr(written)
    shown = mask_url(written)
    return f"the value of {shown}" if SECRET_REF.search(written) else repr(shown)


def mask_url(url: str) -> str:
    """A URL as it may be shown: its user and password, and every query value, as `***`.

    Everything up to the last `@` is credentials, so an unescaped `/`, `?` or `#` in a
    password is masked with it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    base, question, query = rest.partition("?")
    if question:
        query = "&".join(f"{part.partition('=')[0]}=***" for part in query.split("&"))
    return f"{scheme}://{base}{question}{query}"
