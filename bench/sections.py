"""Named sections of docs/benchmarks.md between HTML comments, so one phase can rewrite its own.

A full run writes the whole file; `python -m bench --only PHASE` replaces that phase's section
(and its rows of the targets table) and leaves the rest as the last full run wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ANCHOR = "### Processes and their logs"
"""Where a file without the section gets one."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def block(name: str, lines: Sequence[str]) -> list[str]:
    begin, end = markers(name)
    return [begin, *lines, end]


def splice_text(text: str, name: str, lines: Sequence[str], anchor: str = ANCHOR) -> str:
    """`text` with section `name` replaced by `lines` (markers added); added if missing."""
    begin, end = markers(name)
    new = "\n".join(block(name, lines))
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        return head + new + tail
    if anchor in text:
        head, _, tail = text.partition(anchor)
        return head + new + "\n\n" + anchor + tail
    if text:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    return "# Benchmarks\n\n" + new + "\n"


def splice(path: Path, name: str, lines: Sequence[str], anchor: str = ANCHOR) -> None:
    text = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(splice_text(text, name, lines, anchor))


def extract(text: str, name: str) -> list[str] | None:
    """The lines of section `name` (markers left out); None if it is not there."""
    begin, end = markers(name)
    if begin not in text or end not in text:
        return None
    inner = text.partition(begin)[2].partition(end)[0]
    return inner.strip("\n").splitlines()
