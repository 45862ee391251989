"""Where the engine's SQL lives, and the named queries loaded from it.

SQL stays in .sql files: migrations in sql/migrations, queries in sql/queries/*.sql, one
file per concern (claim, advance, fail and compensate, leases, operator commands,
reads), as blocks that start with `-- name: <query_name>`; each file opens with the
list of its queries. A rule several queries share is written once, as a block of
sql/parts.sql, and a query includes it by name as `{{part_name}}`: the parts are
expanded here, when the queries are read. The comment lines and the indentation stay
in the files: the database is sent the SQL alone (as_sent). In a source checkout they
sit in the top-level sql/ folder; a wheel carries them inside the engine package.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import LiteralString

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_PART = re.compile(r"\{\{(\w+)\}\}")


def sql_dir() -> Path:
    """The folder holding migrations/ and queries/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "queries").is_dir():
            return candidate
    raise FileNotFoundError(f"the engine's sql/ folder is missing (looked beside {here})")


def parse_queries(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}; a name may appear once."""
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip().rstrip(";")
    return queries


def as_sent(text: str) -> str:
    """The SQL as the database is sent it: without its whole-line comments and its
    indentation, which stay in the files, for readers. Sent with every statement they
    would make the hot ones longer than psycopg caches its parsing of (4 KB:
    psycopg._queries.MAX_CACHED_STATEMENT_LENGTH), and it would parse them again on
    every run. (No query holds a string literal across lines, where indentation counts.)"""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


def include_parts(text: str, shared: dict[str, str]) -> str:
    """The query with each `{{part_name}}` replaced by that part's text."""

    def part(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in shared:
            raise ValueError(f"a query includes {{{{{name}}}}}, which sql/parts.sql does not define")
        return shared[name]

    return _PART.sub(part, text)


@cache
def parts() -> dict[str, str]:
    """The shared parts of sql/parts.sql, read once, as sent; a part may include the
    parts above it."""
    shared: dict[str, str] = {}
    for name, text in parse_queries((sql_dir() / "parts.sql").read_text(encoding="utf-8")).items():
        shared[name] = include_parts(as_sent(text), shared)
    return shared


@cache
def queries() -> dict[str, str]:
    """The named queries of every file in sql/queries, read once, as sent, their parts
    included; a name may appear once."""
    named: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, text in parse_queries(path.read_text(encoding="utf-8")).items():
            if name in named:
                raise ValueError(f"query {name!r} is defined twice (again in {path.name})")
            named[name] = include_parts(as_sent(text), parts())
    return named


def query(name: str) -> LiteralString:
    """The SQL text of one named query.

    Typed as a literal: it comes from the engine's own files, never from user input,
    which is the promise psycopg's LiteralString typing asks for.
    """
    return queries()[name]
