"""The named queries: how a queries file is split, that each file lists what it holds,
and that the store asks only for real names."""

from __future__ import annotations

import ast
import inspect
import re

import pytest

import engine.store
from engine.sqlfiles import (
    as_sent,
    include_parts,
    parse_queries,
    parts,
    queries,
    query,
    sql_dir,
)

QUERIES_TEXT = """\
-- The file's own comment, before any name: ignored.

-- name: first_query
-- Why it exists.
SELECT 1;

--name:second_query
SELECT *
FROM workflows
WHERE id = %(id)s;
--   name:   third_query
UPDATE t SET a = 1
"""


def test_parse_queries_splits_named_blocks() -> None:
    parsed = parse_queries(QUERIES_TEXT)
    assert list(parsed) == ["first_query", "second_query", "third_query"]
    assert parsed["first_query"] == "-- Why it exists.\nSELECT 1"
    assert parsed["second_query"] == "SELECT *\nFROM workflows\nWHERE id = %(id)s"
    assert parsed["third_query"] == "UPDATE t SET a = 1"


def test_text_before_the_first_name_is_dropped() -> None:
    assert parse_queries("-- header only\n") == {}
    assert parse_queries("") == {}
    assert parse_queries("SELECT 0;\n-- name: q\nSELECT 1;") == {"q": "SELECT 1"}


def test_a_name_must_stand_on_its_own_line() -> None:
    text = "-- name: real\nSELECT 1; -- name: not_a_name\n-- name: also bad words\n"
    assert list(parse_queries(text)) == ["real"]


def test_a_duplicate_name_is_refused() -> None:
    text = "-- name: twice\nSELECT 1;\n-- name: other\nSELECT 2;\n-- name: twice\nSELECT 3;\n"
    with pytest.raises(ValueError, match="query 'twice' is defined twice"):
        parse_queries(text)


def test_sql_dir_holds_the_queries_and_migrations() -> None:
    folder = sql_dir()
    assert (folder / "queries" / "claim.sql").is_file()
    assert sorted(path.name for path in (folder / "migrations").glob("*.sql"))[0] == "0001_init.sql"


def test_queries_are_read_once_from_every_file() -> None:
    assert queries() is queries()
    files = sorted((sql_dir() / "queries").glob("*.sql"))
    assert len(files) > 1
    merged = {
        name: include_parts(as_sent(text), parts())
        for path in files
        for name, text in parse_queries(path.read_text()).items()
    }
    assert queries() == merged


def test_a_part_is_included_where_a_query_names_it() -> None:
    shared = {"release": "locked_by = NULL"}
    assert include_parts("UPDATE w SET {{release}}, a = 1", shared) == "UPDATE w SET locked_by = NULL, a = 1"
    assert include_parts("SELECT '{}'", shared) == "SELECT '{}'"
    with pytest.raises(ValueError, match=r"includes \{\{missing\}\}, which sql/parts.sql does not define"):
        include_parts("SET {{missing}}", shared)


def test_every_part_is_listed_included_and_expanded() -> None:
    text = (sql_dir() / "parts.sql").read_text()
    header = text[: text.index("-- name:")]
    assert re.findall(r"^--   (\w+)$", header, flags=re.MULTILINE) == list(parts())
    for name in parts():
        assert any(parts()[name] in query_text for query_text in queries().values()), name
    assert not any("{{" in query_text for query_text in queries().values())


def test_each_queries_file_opens_with_the_list_of_its_queries() -> None:
    for path in (sql_dir() / "queries").glob("*.sql"):
        text = path.read_text()
        header = text[: text.index("-- name:")]
        listed = re.findall(r"^--   (\w+)$", header, flags=re.MULTILINE)
        assert listed == list(parse_queries(text)), path.name


def test_every_query_has_sql_and_no_trailing_semicolon() -> None:
    for name, text in queries().items():
        assert text, name
        assert not text.endswith(";"), name
        assert re.search(r"\b(SELECT|INSERT|UPDATE|DELETE|WITH|SET)\b", text), name


def test_queries_use_bound_parameters_only() -> None:
    for name, text in queries().items():
        # psycopg reads every other % as a placeholder: a literal one is written %%.
        # Parameters are sent as text (%(name)s), or in binary (%(name)b).
        without_parameters = re.sub(r"%\(\w+\)[sb]|%%", "", text)
        assert "%" not in without_parameters, name


def test_query_returns_one_text_and_refuses_unknown_names() -> None:
    assert query("get_workflow") == queries()["get_workflow"]
    with pytest.raises(KeyError):
        query("no_such_query")


def _query_names_used_by_the_store() -> set[str]:
    """Every string literal the store passes as the first argument of a query helper."""
    tree = ast.parse(inspect.getsource(engine.store))
    helpers = {"_one", "_all", "_scalar", "query"}
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        first = node.args[0]
        if called in helpers and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value)
    return names


def test_every_query_the_store_uses_exists() -> None:
    used = _query_names_used_by_the_store()
    assert used, "the store's query names were not found"
    assert used <= set(queries()), sorted(used - set(queries()))


def test_store_methods_are_named_after_their_query() -> None:
    for name in _query_names_used_by_the_store():
        assert callable(getattr(engine.store.Store, name, None)), name


def test_every_query_is_sent_as_sent_and_fits_psycopgs_parse_cache() -> None:
    # Longer statements are parsed for placeholders again on every run (psycopg 3.1+).
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH  # noqa: PLC0415

    for name, text in queries().items():
        assert not any(line.lstrip().startswith("--") for line in text.splitlines()), name
        assert len(text.encode()) <= MAX_CACHED_STATEMENT_LENGTH, name
