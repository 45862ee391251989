"""Idempotency keys, computed exactly as the SQL functions of sql/migrations compute them.

A workflow's key is `workflow:{type}:{user_id}:{sha256 of the canonical input}`, and a
step's is `step:{step_name}:{sha256 of the workflow key, a newline, the canonical step
input}`. The canonical form is what `workflow_canonical_json` produces: object keys
sorted by code point, no white space, numbers by value (1.0, 1e3 and 1000.0 spell 1,
1000 and 1000), strings escaped as jsonb prints them. A test feeds awkward inputs to
both sides and compares.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from engine.errors import UnstorableValueError


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a JSON-compatible value."""
    if isinstance(value, Mapping):
        items = sorted((_check_key(key), item) for key, item in value.items())
        return "{" + ",".join(f"{_string(key)}:{canonical_json(item)}" for key, item in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_json(item) for item in value) + "]"
    if isinstance(value, str):
        return _string(value)
    # bool before int: True is an int in Python.
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float | Decimal):
        return _number(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
    return key


def check_storable_text(text: str, what: str = "a JSON string") -> None:
    """Refuse text PostgreSQL cannot store: a NUL character, or a lone surrogate (not UTF-8)."""
    if "\x00" in text:
        raise UnstorableValueError(f"{what} cannot contain the NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


def _string(text: str) -> str:
    check_storable_text(text)
    # jsonb escapes ", \ and control characters as json.dumps does, keeping the rest.
    return json.dumps(text, ensure_ascii=False)


def _number(number: float | Decimal) -> str:
    if isinstance(number, int):
        return str(number)
    # repr() is what json.dumps sends for a float, and PostgreSQL reads that text as an
    # exact decimal: going through the same text keeps both sides on the same value.
    exact = Decimal(repr(number)) if isinstance(number, float) else number
    if not exact.is_finite():
        raise UnstorableValueError(f"{number} is not a JSON number")
    # Checked before the digits are written out: 1e999999999, read as a Decimal, would
    # otherwise become a billion characters.
    exponent = int(exact.as_tuple().exponent)  # an int: the number is finite
    if exact and (exponent < -NUMERIC_MAX_SCALE or exact.adjusted() >= NUMERIC_MAX_INTEGER_DIGITS):
        raise UnstorableValueError(f"{str(exact)[:40]} is beyond the range of PostgreSQL's numeric")
    if exact == 0:
        return "0"  # PostgreSQL's numeric has no negative zero.
    # Fixed-point with every digit (no context rounding), then trim_scale's trimming.
    text = format(exact, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# PostgreSQL's numeric (and so jsonb's numbers): at most 131,072 digits before the
# decimal point and 16,383 after it.
NUMERIC_MAX_INTEGER_DIGITS = 131_072
NUMERIC_MAX_SCALE = 16_383

# A \u0000 escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def json_text(value: Any) -> str:
    """The JSON text under which a value is stored (a step's output); the one encoder
    that both checks and serialises it.

    Raises UnstorableValueError for what jsonb cannot hold (NaN, infinity, a NUL
    character, a lone surrogate) and TypeError for what is not JSON at all. Plain
    values go through json.dumps; a Decimal or a mapping that is not a dict through
    canonical_json, which writes Decimals exactly.
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except TypeError:
        return canonical_json(value)
    except ValueError as error:  # NaN or infinity; a circular reference
        raise UnstorableValueError(f"not storable as JSON: {error}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise UnstorableValueError("a JSON string cannot contain the NUL character (\\u0000)")
    check_storable_text(text, "the value")
    return text


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def start_identity(workflow_type: str, user_id: str | None, input: Any) -> dict[str, str]:
    """What makes two starts the same start: the parts of the workflow key, before hashing.

    No user and an empty user are alike; inputs compare by their canonical JSON, so key
    order and number spelling make no difference.
    """
    return {
        "type": workflow_type,
        "user": user_id or "",
        "input": canonical_json({} if input is None else input),
    }


def workflow_idempotency_key(workflow_type: str, user_id: str | None, input: Any) -> str:
    """The key that deduplicates starts of the same workflow for the same user and input."""
    parts = start_identity(workflow_type, user_id, input)
    return f"workflow:{parts['type']}:{parts['user']}:{_sha256_hex(parts['input'])}"


def step_idempotency_key(workflow_key: str, step_name: str, step_input: Any) -> str:
    """The key handed to every attempt of one step, for outside services to deduplicate."""
    return step_key(step_name, step_input_digest(workflow_key, step_input))


def step_input_digest(workflow_key: str, step_input: Any) -> str:
    """The hash part of a step key: steps that share an input share it."""
    return _sha256_hex(workflow_key + chr(10) + canonical_json({} if step_input is None else step_input))


def step_key(step_name: str, digest: str) -> str:
    """A step's key from its name and its input's digest."""
    return f"step:{step_name}:{digest}"


def compensation_key(step_name: str, digest: str) -> str:
    """The key handed to every attempt of a step's compensation: never the forward
    step's, so a service that deduplicates by key cannot answer an undo with the
    original call's result."""
    return f"compensate:{step_name}:{digest}"
