"""Canonical JSON and the idempotency keys built on it (the Python side of the SQL functions)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import UnstorableValueError
from engine.idempotency import canonical_json, json_text, step_idempotency_key, workflow_idempotency_key

HEX64 = r"[0-9a-f]{64}"
# PostgreSQL text cannot hold NUL, so canonical_json refuses it (tested below).
storable_text = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(storable_text, max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(storable_text, max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(storable_text, max_size=6), json_values, max_size=3)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reorder(value: Any) -> Any:
    """The same value with every object's keys inserted in reverse order."""
    if isinstance(value, dict):
        return {key: _reorder(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reorder(item) for item in value]
    return value


# canonical_json: structure and order


@settings(max_examples=60)
@given(value=json_values)
def test_key_order_does_not_change_the_text(value: Any) -> None:
    assert canonical_json(_reorder(value)) == canonical_json(value)


@settings(max_examples=60)
@given(value=json_values, indent=st.sampled_from([None, 0, 2, "\t"]))
def test_white_space_of_the_source_text_does_not_change_the_text(value: Any, indent: Any) -> None:
    spaced = json.dumps(value, indent=indent, separators=(" , ", " :  "))
    assert canonical_json(json.loads(spaced)) == canonical_json(value)


@settings(max_examples=60)
@given(value=json_values)
def test_the_canonical_text_is_valid_json_and_a_fixed_point(value: Any) -> None:
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text


@settings(max_examples=60)
@given(value=json_values)
def test_the_canonical_text_has_no_exponents_and_no_white_space_outside_strings(
    value: Any,
) -> None:
    text = canonical_json(value)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", outside_strings)
    assert not re.search(r"[eE]", outside_strings.replace("true", "").replace("false", ""))


def test_objects_have_no_white_space_and_sorted_keys() -> None:
    assert canonical_json({"b": 1, "a": [1, 2, {"d": None, "c": True}]}) == (
        '{"a":[1,2,{"c":true,"d":null}],"b":1}'
    )


def test_nested_objects_are_canonical_at_every_depth() -> None:
    one = {"outer": {"z": {"y": 1, "x": 2.0}, "a": [{"q": 1e3, "p": "é"}]}}
    other = json.loads('{ "outer" : { "a" : [ { "p" : "é", "q" : 1000 } ], "z" : { "x" : 2, "y" : 1.0 } } }')
    assert canonical_json(one) == canonical_json(other)
    assert canonical_json(one) == '{"outer":{"a":[{"p":"é","q":1000}],"z":{"x":2,"y":1}}}'


def test_keys_are_sorted_by_code_point() -> None:
    value = {"😀": 4, "é": 3, "b": 2, "B": 1, "": 0, "a": 5, "ab": 6}
    assert canonical_json(value) == '{"":0,"B":1,"a":5,"ab":6,"b":2,"é":3,"😀":4}'


@given(keys=st.lists(st.text(storable_text, max_size=4), unique=True, max_size=8))
def test_keys_come_out_in_code_point_order(keys: list[str]) -> None:
    text = canonical_json(dict.fromkeys(keys, 0))
    decoded = json.loads(text, object_pairs_hook=lambda pairs: [key for key, _ in pairs])
    assert decoded == sorted(keys, key=lambda key: [ord(char) for char in key])


def test_scalars_and_containers() -> None:
    assert canonical_json(None) == "null"
    assert canonical_json(True) == "true"
    assert canonical_json(False) == "false"
    assert canonical_json([]) == "[]"
    assert canonical_json({}) == "{}"
    assert canonical_json((1, "a")) == canonical_json([1, "a"]) == '[1,"a"]'


def test_booleans_are_not_numbers() -> None:
    assert canonical_json([True, 1, False, 0]) == "[true,1,false,0]"


# canonical_json: numbers


@pytest.mark.parametrize(
    ("spellings", "expected"),
    [
        ([1, 1.0, Decimal("1"), Decimal("1.000")], "1"),
        ([1000, 1e3, 1000.0, Decimal("1E+3"), Decimal("1000.00")], "1000"),
        ([0, 0.0, -0.0, Decimal("-0"), Decimal("0.000")], "0"),
        ([1.5, Decimal("1.50")], "1.5"),
        ([-2.25, Decimal("-2.250")], "-2.25"),
        ([1e-7, Decimal("1E-7")], "0.0000001"),
        ([1e16, 10**16], "10000000000000000"),
        ([0.1], "0.1"),
    ],
)
def test_numbers_are_spelled_by_value(spellings: list[Any], expected: str) -> None:
    assert {canonical_json(number) for number in spellings} == {expected}


def test_json_text_spellings_of_one_number_agree() -> None:
    texts = ["1000", "1e3", "1E3", "1000.0", "1.0e3", "10000e-1"]
    assert {canonical_json(json.loads(text)) for text in texts} == {"1000"}


def test_big_integers_keep_every_digit() -> None:
    assert canonical_json(10**30 + 1) == "1" + "0" * 29 + "1"
    assert canonical_json(-(10**40)) == "-1" + "0" * 40


@given(number=st.integers())
def test_integers_are_their_decimal_text(number: int) -> None:
    assert canonical_json(number) == str(number)


@given(number=st.integers(min_value=-(2**53), max_value=2**53))
def test_an_integral_float_is_spelled_like_the_integer(number: int) -> None:
    assert canonical_json(float(number)) == str(number)


@given(number=st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_is_spelled_as_the_exact_decimal_of_its_repr(number: float) -> None:
    text = canonical_json(number)
    assert "e" not in text
    assert "E" not in text
    assert Decimal(text) == Decimal(repr(number))
    assert float(text) == number  # -0.0 == 0.0, so this holds for "0" too


@pytest.mark.parametrize(
    "number",
    [math.nan, math.inf, -math.inf, Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")],
)
def test_non_finite_numbers_are_refused(number: Any) -> None:
    with pytest.raises(ValueError, match="not a JSON number"):
        canonical_json(number)
    with pytest.raises(ValueError, match="not a JSON number"):
        canonical_json({"nested": [1, number]})


@pytest.mark.parametrize("number", ["1e999999999", "1e-999999999", "1e131072", "1e-16384"])
def test_a_decimal_beyond_postgresqls_numeric_is_refused_before_its_digits_are_written(number: str) -> None:
    # A JSON number read exactly (the HTTP API, the CLI) could otherwise make a client's
    # 11 bytes into a billion characters.
    with pytest.raises(ValueError, match="beyond the range of PostgreSQL's numeric"):
        json_text({"amount": Decimal(number)})


def test_a_decimal_at_the_edges_of_numeric_is_kept_whole() -> None:
    assert len(canonical_json(Decimal("1e131071"))) == 131_072
    assert canonical_json(Decimal("1e-16383")) == "0." + "0" * 16_382 + "1"
    assert canonical_json(Decimal("0e999999999")) == "0"


# canonical_json: strings and keys


def test_unicode_is_kept_as_is() -> None:
    assert canonical_json("é😀 中文") == '"é😀 中文"'
    assert canonical_json({"ключ": "значение"}) == '{"ключ":"значение"}'


def test_control_characters_quotes_and_backslashes_are_escaped() -> None:
    text = 'a\n\t\r\x01\x1f"\\'
    assert canonical_json(text) == r'"a\n\t\r\u0001\u001f\"\\"'
    assert canonical_json({text: 1}) == "{" + json.dumps(text) + ":1}"


@pytest.mark.parametrize("value", ["a\x00b", {"k\x00": 1}, {"k": ["\x00"]}])
def test_nul_characters_are_refused_as_postgresql_cannot_store_them(value: Any) -> None:
    with pytest.raises(UnstorableValueError, match="NUL"):
        canonical_json(value)


@given(text=st.text(storable_text))
def test_strings_are_escaped_as_json_dumps_without_ascii_escapes(text: str) -> None:
    assert canonical_json(text) == json.dumps(text, ensure_ascii=False)
    assert json.loads(canonical_json(text)) == text


@pytest.mark.parametrize("key", [1, None, 1.5, ("a",), b"a"])
def test_non_string_keys_are_refused(key: Any) -> None:
    with pytest.raises(TypeError, match="keys must be strings"):
        canonical_json({key: 1})
    with pytest.raises(TypeError, match="keys must be strings"):
        canonical_json({"ok": [{key: 1}]})


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), 1 + 2j])
def test_values_that_are_not_json_are_refused(value: Any) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        canonical_json([value])


# workflow keys


def test_workflow_key_format() -> None:
    key = workflow_idempotency_key("payment.send", "user-7", {"amount": 10})
    digest = _sha256('{"amount":10}')
    assert key == f"workflow:payment.send:user-7:{digest}"


@settings(max_examples=50)
@given(
    workflow_type=st.sampled_from(["flow", "payment.send", "Orders_v2", "a-b.c"]),
    user_id=st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", max_size=10),
    value=json_objects,
)
def test_workflow_key_is_type_user_and_digest_of_the_canonical_input(
    workflow_type: str, user_id: str | None, value: dict[str, Any]
) -> None:
    key = workflow_idempotency_key(workflow_type, user_id, value)
    expected_user = user_id or ""
    assert re.fullmatch(rf"workflow:{re.escape(workflow_type)}:{re.escape(expected_user)}:{HEX64}", key)
    assert key.rsplit(":", 1)[1] == _sha256(canonical_json(value))


def test_a_missing_user_is_an_empty_field() -> None:
    key = workflow_idempotency_key("flow", None, {"a": 1})
    assert re.fullmatch(rf"workflow:flow::{HEX64}", key)
    assert key == workflow_idempotency_key("flow", "", {"a": 1})


def test_a_missing_input_counts_as_an_empty_object() -> None:
    assert workflow_idempotency_key("flow", "u", None) == workflow_idempotency_key("flow", "u", {})
    assert workflow_idempotency_key("flow", "u", None).endswith(_sha256("{}"))


@settings(max_examples=50)
@given(value=json_objects)
def test_workflow_key_ignores_key_order_and_number_spelling(value: dict[str, Any]) -> None:
    respelled = json.loads(json.dumps(_reorder(value), indent=1))
    assert workflow_idempotency_key("flow", "u", respelled) == workflow_idempotency_key("flow", "u", value)


def test_workflow_key_changes_with_type_user_and_input() -> None:
    base = workflow_idempotency_key("flow", "u1", {"a": 1})
    others = [
        workflow_idempotency_key("flow2", "u1", {"a": 1}),
        workflow_idempotency_key("flow", "u2", {"a": 1}),
        workflow_idempotency_key("flow", None, {"a": 1}),
        workflow_idempotency_key("flow", "u1", {"a": 2}),
        workflow_idempotency_key("flow", "u1", {"a": "1"}),
        workflow_idempotency_key("flow", "u1", {"a": True}),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert workflow_idempotency_key("flow", "u1", {"a": 1.0}) == base


# step keys


def test_step_key_format() -> None:
    workflow_key = workflow_idempotency_key("flow", "u", {"a": 1})
    key = step_idempotency_key(workflow_key, "charge", {"amount": 5})
    assert re.fullmatch(rf"step:charge:{HEX64}", key)
    assert key == "step:charge:" + _sha256(workflow_key + "\n" + '{"amount":5}')


@settings(max_examples=50)
@given(
    workflow_input=json_objects,
    step_name=st.text(alphabet="abcdefghij_", min_size=1, max_size=8),
    step_input=json_objects,
)
def test_step_keys_differ_between_workflows(
    workflow_input: dict[str, Any], step_name: str, step_input: dict[str, Any]
) -> None:
    # Two workflows whose inputs differ: the second wraps the first.
    first = workflow_idempotency_key("flow", "u", workflow_input)
    second = workflow_idempotency_key("flow", "u", {"wrapped": workflow_input})
    first_key = step_idempotency_key(first, step_name, step_input)
    second_key = step_idempotency_key(second, step_name, step_input)
    assert re.fullmatch(rf"step:{step_name}:{HEX64}", first_key)
    assert re.fullmatch(rf"step:{step_name}:{HEX64}", second_key)
    assert first_key != second_key


def test_step_key_is_stable_and_changes_with_name_and_input() -> None:
    workflow_key = workflow_idempotency_key("flow", "u", {})
    key = step_idempotency_key(workflow_key, "charge", {"b": 1, "a": 2})
    assert key == step_idempotency_key(workflow_key, "charge", {"a": 2.0, "b": 1})
    assert key != step_idempotency_key(workflow_key, "refund", {"b": 1, "a": 2})
    assert key != step_idempotency_key(workflow_key, "charge", {"b": 1, "a": 3})


def test_a_missing_step_input_counts_as_an_empty_object() -> None:
    workflow_key = workflow_idempotency_key("flow", "u", {})
    assert step_idempotency_key(workflow_key, "s", None) == step_idempotency_key(workflow_key, "s", {})
