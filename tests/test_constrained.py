"""Constrained tool-call decoding: the fast token mask against a slow reference, and generation.

The reference is a recursive-descent parser that reads the whole text from the start, straight
from the raw JSON Schema dicts, and reports whether the text is an invalid, an unfinished or a
complete call. A token is allowed after a prefix exactly when the reference does not call
prefix + token invalid. The fast mask must equal that set for every prefix tried.
"""

from __future__ import annotations

import functools
import json
import random
import re
import statistics
import time
from fractions import Fraction

import pytest
import torch
from jsonschema import Draft202012Validator

from codeling import chat
from codeling.config import ModelConfig
from codeling.errors import CodelingError
from codeling.inference.constrained import (ToolCallConstraint, ToolCallGrammar, _NumberNode,
                                            token_bytes)
from codeling.inference.generate import GenerationConfig, Generator
from codeling.inference.tool_calls import tool_specs, validate_call
from codeling.models.decoder import CodeModel
from codeling.tokenizer import train_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "temp": {"type": "number", "minimum": 0, "exclusiveMaximum": 2.5},
        "opts": {"type": "object", "properties": {"x": {"type": "boolean"},
                                                  "y": {"type": "null"}}, "required": ["x"]},
        "note": {"type": ["string", "null"]},
        "level": {"enum": [1, 12, "high", None]},
    }, "required": ["city", "days"], "additionalProperties": False}}}
WEATHER_NOW = {"name": "get_weather_now", "parameters": {"type": "object", "properties": {
    "q": {"type": "string", "minLength": 2}, 'say "hi"': {"type": "boolean"},
    "größe": {"type": "integer"}}, "required": ["q"]}}
SERVER = {"name": "serve", "parameters": {"type": "object", "properties": {
    "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
    "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "meta": {"type": "object"},
    "anything": {},
    "count": {"type": "integer"},
    "value": {"type": "number"},
    "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    "code": {"type": "string"},
}, "required": ["port", "ids"]}}
NOOP = {"name": "noop"}
TOOLS = [WEATHER, WEATHER_NOW, SERVER, NOOP]

VALID_CALLS = [
    {"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}},
    {"name": "get_weather", "arguments": {"days": 14, "unit": "f", "city": "", "tags": ["a", "b"],
                                          "temp": 2.49, "opts": {"y": None, "x": False},
                                          "note": None, "level": 12}},
    {"name": "get_weather", "arguments": {"city": "Zürich\n\"", "days": 1, "note": "\\ \u0001é",
                                          "level": "high", "temp": 0}},
    {"name": "get_weather_now",
     "arguments": {"q": "日本語 ok", 'say "hi"': True, "größe": -40}},
    {"name": "serve", "arguments": {"port": 8080, "ids": [1, -2, 30], "ratio": 0.05,
                                    "meta": {"k": [1, {"x": "y"}], "": True},
                                    "anything": [None, 1.5e-07, "s"], "value": -0.25,
                                    "count": 0, "code": "def f(x):\n\treturn x  # ok"}},
    {"name": "noop", "arguments": {}},
]


# -- the slow reference --------------------------------------------------------------------------


class NeedMore(Exception):
    """The text ends before the call does."""


class Invalid(Exception):
    """No text that starts like this is a valid call."""


# \u00XX escapes as json.dumps writes them: control characters without a short escape.
HEX_ESCAPES = {f"{code:04x}".encode() for code in range(0x20) if chr(code) not in "\b\t\n\f\r"}
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
INTEGER_TEXT = re.compile(r"0|-?[1-9][0-9]*")
DECIMAL_TEXT = re.compile(r"(0|-?[1-9][0-9]*|-0(?=\.))(\.[0-9]+)?")
LEADING_ZERO = re.compile(r"-?0[0-9]")
NUMBER_TEXT = re.compile(r"(0|-?[1-9][0-9]*|-0(?=\.))(\.[0-9]+)?(e[+-][0-9]+)?")


@functools.lru_cache(maxsize=1)
def utf8_partials() -> frozenset[bytes]:
    """Every proper prefix of the UTF-8 encoding of a code point (surrogates excluded)."""
    partials = set()
    for code in range(0x80, 0x110000):
        if 0xD800 <= code < 0xE000:
            continue
        encoded = chr(code).encode("utf-8")
        for size in range(1, len(encoded)):
            partials.add(encoded[:size])
    return frozenset(partials)


def number_in_range(text: str, schema: dict) -> bool:
    """Compare a number text with the schema's bounds, as exact fractions."""
    value = Fraction(text)
    checks = [("minimum", lambda bound: value >= bound), ("maximum", lambda bound: value <= bound),
              ("exclusiveMinimum", lambda bound: value > bound),
              ("exclusiveMaximum", lambda bound: value < bound)]
    return all(check(Fraction(repr(schema[key]))) for key, check in checks if key in schema)


class Reference:
    """Classify a text as "invalid", "prefix" or "complete" by parsing it from the start."""

    def __init__(self, tools):
        self.specs = tool_specs(tools)

    def status(self, text: bytes) -> str:
        self.text, self.pos = text, 0
        try:
            self.call()
        except NeedMore:
            return "prefix"
        except Invalid:
            return "invalid"
        return "complete" if self.pos == len(text) else "invalid"

    def peek(self) -> int:
        if self.pos >= len(self.text):
            raise NeedMore
        return self.text[self.pos]

    def expect(self, literal: bytes) -> None:
        for byte in literal:
            if self.peek() != byte:
                raise Invalid
            self.pos += 1

    def choose(self, options: dict[bytes, object]) -> object:
        rest = self.text[self.pos:]
        matches = [option for option in options if rest.startswith(option)]
        if matches:
            option = max(matches, key=len)
            self.pos += len(option)
            return options[option]
        if any(option.startswith(rest) for option in options):
            raise NeedMore
        raise Invalid

    def call(self) -> None:
        self.expect(b'{"name": ')
        names = {json.dumps(name, ensure_ascii=False).encode(): name for name in self.specs}
        name = self.choose(names)
        self.expect(b', "arguments": ')
        self.value({"type": "object", **self.specs[name]["parameters"]})
        self.expect(b"}")

    def value(self, schema) -> None:
        if schema is True or schema == {}:
            return self.any_value()
        if "enum" in schema or "const" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            validator = Draft202012Validator(schema)
            self.choose({json.dumps(value, ensure_ascii=False).encode(): value
                         for value in values if validator.is_valid(value)})
            return

        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self.alternatives(schema[keyword])

        kind = schema.get("type")
        if kind is None and ("properties" in schema or "required" in schema):
            kind = "object"
        if isinstance(kind, list):
            kinds = [one for one in kind if not (one == "integer" and "number" in kind)]
            return self.alternatives([{**schema, "type": one} for one in kinds])

        if kind == "object":
            return self.object(schema)
        if kind == "array":
            return self.array(schema)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return self.number(schema, kind == "integer")
        if kind == "boolean":
            return self.choose({b"true": True, b"false": False})
        if kind == "null":
            return self.choose({b"null": None})
        return self.any_value()

    def alternatives(self, schemas) -> None:
        start = self.pos
        for schema in schemas:
            self.pos = start
            try:
                return self.value(schema)
            except Invalid:
                continue
        raise Invalid

    def any_value(self) -> None:
        byte = self.peek()
        if byte == ord("{"):
            return self.free_object(True)
        if byte == ord("["):
            return self.array({})
        if byte == ord('"'):
            return self.string({})
        if byte in b"-0123456789":
            return self.number({}, integer=False)
        self.choose({b"true": True, b"false": False, b"null": None})

    def object(self, schema) -> None:
        properties = schema.get("properties")
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if properties is None and not required and extra is not False:
            return self.free_object(extra)
        properties = dict(properties or {})
        for key in required:
            properties.setdefault(key, True)
        self.expect(b"{")
        seen: set[str] = set()
        while True:
            byte = self.peek()
            if byte == ord("}"):
                if set(required) - seen:
                    raise Invalid
                self.pos += 1
                return
            if seen:
                if byte != ord(",") or not set(properties) - seen:
                    raise Invalid
                self.pos += 1
                self.expect(b" ")
            key = self.choose({(json.dumps(key, ensure_ascii=False) + ": ").encode(): key
                               for key in properties if key not in seen})
            seen.add(key)
            self.value(properties[key])

    def free_object(self, value_schema) -> None:
        self.expect(b"{")
        first = True
        while True:
            byte = self.peek()
            if byte == ord("}"):
                self.pos += 1
                return
            if not first:
                if byte != ord(","):
                    raise Invalid
                self.pos += 1
                self.expect(b" ")
            self.string({})
            self.expect(b": ")
            self.value(value_schema if isinstance(value_schema, dict) else True)
            first = False

    def array(self, schema) -> None:
        items = schema.get("items", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        self.expect(b"[")
        count = 0
        while True:
            byte = self.peek()
            if byte == ord("]"):
                if count < low:
                    raise Invalid
                self.pos += 1
                return
            if count:
                if byte != ord(",") or (high is not None and count >= high):
                    raise Invalid
                self.pos += 1
                self.expect(b" ")
            elif high == 0:
                raise Invalid
            self.value(items)
            count += 1

    def string(self, schema) -> None:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        self.expect(b'"')
        count = 0
        while True:
            byte = self.peek()
            if byte == ord('"'):
                if count < low:
                    raise Invalid
                self.pos += 1
                return
            if byte < 0x20:
                raise Invalid
            count += 1
            if high is not None and count > high:
                raise Invalid
            if byte == ord("\\"):
                self.pos += 1
                escape = self.peek()
                self.pos += 1
                if escape in b'"\\bfnrt':
                    continue
                if escape != ord("u"):
                    raise Invalid
                digits = self.text[self.pos:self.pos + 4]
                if len(digits) == 4 and digits in HEX_ESCAPES:
                    self.pos += 4
                    continue
                if len(digits) < 4 and any(escape.startswith(digits) for escape in HEX_ESCAPES):
                    raise NeedMore
                raise Invalid
            self.character()

    def character(self) -> None:
        """Consume one UTF-8 encoded code point."""
        for size in range(1, 5):
            chunk = self.text[self.pos:self.pos + size]
            if len(chunk) < size:
                break
            try:
                decoded = chunk.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(decoded) == 1:
                self.pos += size
                return
        if self.text[self.pos:] in utf8_partials():
            raise NeedMore
        raise Invalid

    def number(self, schema, integer: bool) -> None:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in b"-+.e0123456789":
            self.pos += 1
        run = self.text[start:self.pos].decode()
        if self.pos == len(self.text):
            if number_viable(run, json.dumps(schema, sort_keys=True), integer):
                raise NeedMore
            raise Invalid
        if not number_complete(run, json.dumps(schema, sort_keys=True), integer):
            raise Invalid


@functools.lru_cache(maxsize=100_000)
def number_complete(run: str, schema_text: str, integer: bool) -> bool:
    schema = json.loads(schema_text)
    bounded = any(key in schema for key in BOUND_KEYS)
    if integer:
        pattern = INTEGER_TEXT
    elif bounded:
        pattern = DECIMAL_TEXT  # a bounded number is written without an exponent
    else:
        pattern = NUMBER_TEXT
    return bool(pattern.fullmatch(run)) and number_in_range(run, schema)


@functools.lru_cache(maxsize=None)
def number_viable(run: str, schema_text: str, integer: bool) -> bool:
    """Whether up to 3 more characters complete the number (enough for the test schemas)."""
    schema = json.loads(schema_text)
    if not any(key in schema for key in BOUND_KEYS):
        return any(number_complete(run + extra, schema_text, integer)
                   for extra in ("", "0", "1", ".0", "+0"))
    alphabet = "0123456789" if integer else "0123456789."
    texts = [run]
    for _ in range(4):
        if any(number_complete(text, schema_text, integer) for text in texts):
            return True
        texts = [text + char for text in texts for char in alphabet]
    return False


# -- helpers -------------------------------------------------------------------------------------


def fast_status(grammar: ToolCallGrammar, text: bytes) -> str:
    state = grammar.advance(grammar.start, text)
    if state is None:
        return "invalid"
    return "complete" if grammar.is_complete(state) else "prefix"


def reference_allowed(reference: Reference, constraint: ToolCallConstraint, tokenizer,
                      prefix: bytes) -> set[int]:
    """Brute force: every token whose text keeps prefix + token completable."""
    if reference.status(prefix) == "complete":
        return {tokenizer.token_id("<|tool_call|>"), tokenizer.token_id("<|end_turn|>")}
    return {token_id for token_id, data in enumerate(token_bytes(tokenizer))
            if data and reference.status(prefix + data) != "invalid"}


def random_walk_prefixes(constraint: ToolCallConstraint, tokenizer, rng: random.Random,
                         walks: int, max_tokens: int = 60) -> list[bytes]:
    """Prefixes met while picking random allowed tokens, half of the time the fastest closer."""
    data = token_bytes(tokenizer)
    grammar = constraint.grammar
    prefixes = []
    for _ in range(walks):
        state, text = constraint.start, b""
        for _ in range(max_tokens):
            prefixes.append(text)
            allowed = [token for token in constraint.allowed_ids(state) if data[token]]
            if not allowed:
                break
            if rng.random() < 0.5:
                token = min(allowed, key=lambda token: (
                    grammar.min_completion(constraint.advance(state, token)), token))
            else:
                token = rng.choice(allowed)
            state = constraint.advance(state, token)
            text += data[token]
    return prefixes


def call_text(call: dict) -> str:
    return json.dumps(call, ensure_ascii=False)


@pytest.fixture(scope="module")
def constraint(small_tokenizer):
    return ToolCallConstraint(TOOLS, small_tokenizer)


@pytest.fixture(scope="module")
def reference():
    return Reference(TOOLS)


# -- the grammar ---------------------------------------------------------------------------------


def test_reference_accepts_valid_calls(reference):
    for call in VALID_CALLS:
        assert validate_call(call, TOOLS) == []
        text = call_text(call).encode()
        assert reference.status(text) == "complete"
        assert reference.status(text[:-1]) == "prefix"
        assert reference.status(text + b" ") == "invalid"


def test_grammar_accepts_json_dumps_layout(constraint):
    grammar = constraint.grammar
    for call in VALID_CALLS:
        text = call_text(call).encode()
        state = grammar.advance(grammar.start, text)
        assert state is not None, text
        assert grammar.is_complete(state)
        assert grammar.min_completion(state) == 0
        for cut in range(len(text)):
            assert not grammar.is_complete(grammar.advance(grammar.start, text[:cut]))


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3} }',       # space
    '{"name": "get_weather", "arguments": {"city": "Oslo","days": 3}}',         # separator
    '{"name": "get_weather", "arguments": {"city":"Oslo", "days": 3}}',
    '{"name": "get_weather", "arguments": {\n"city": "Oslo", "days": 3}}',      # newline
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',                   # required
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 15}}',       # maximum
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 03}}',       # leading zero
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3.0}}',      # integer
    '{"name": "get_weather", "arguments": {"city": "Amsterdam", "days": 3}}',   # maxLength
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "unit": "k"}}',  # enum
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "wind": 1}}',    # extra key
    '{"name": "get_weather", "arguments": {"city": "Oslo", "city": "Rome", "days": 3}}',
    '{"name": "get_weather", "arguments": {"city": "Os\\/lo", "days": 3}}',     # \/ escape
    '{"name": "get_weather", "arguments": {"city": "Os\\u0041", "days": 3}}',   # \u0041
    '{"name": "get_weather", "arguments": {"city": "Os\tlo", "days": 3}}',      # raw tab
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "temp": 2.5}}',
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "temp": 1e-3}}',
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3, "level": 2}}',
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}x',      # trailing text
    '{"name": "get_time", "arguments": {}}',                                    # unknown tool
    '{"arguments": {}, "name": "noop"}',                                        # key order
    '{"name": "noop", "arguments": []}',
    '{"name": "serve", "arguments": {"port": 80, "ids": [1]}}',
    '{"name": "serve", "arguments": {"port": 8080, "ids": []}}',                # minItems
    '{"name": "serve", "arguments": {"port": 8080, "ids": [1], "count": -0}}',
    '{"name": "serve", "arguments": {"port": 8080, "ids": [1], "ratio": 0}}',   # exclusive
    '{"name": "serve", "arguments": {"port": 8080, "ids": [1], "value": 1E5}}',
])
def test_grammar_rejects_invalid_text(constraint, reference, text):
    assert fast_status(constraint.grammar, text.encode()) == "invalid"
    assert reference.status(text.encode()) == "invalid"


def test_grammar_rejects_invalid_utf8(constraint):
    head = b'{"name": "get_weather", "arguments": {"city": "'
    grammar = constraint.grammar
    for bad in (b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff",
                b"\xe2\x82\x22"):
        assert grammar.advance(grammar.start, head + bad) is None, bad
    assert grammar.advance(grammar.start, head + "€".encode()[:2]) is not None


def test_mutated_calls_match_reference(constraint, reference):
    rng = random.Random(0)
    pool = [b" ", b"\n", b",", b'"', b"}", b"{", b"]", b"0", b"7", b".", b"-", b"e", b"a",
            b"\\", b"\\u00", "é".encode(), b"\xe2", b": ", b"null", b"true"]
    texts = [call_text(call).encode() for call in VALID_CALLS]
    checked = 0
    for _ in range(120):
        text = bytearray(rng.choice(texts))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(text))
            if rng.random() < 0.3:
                del text[at]
            else:
                text[at:at] = rng.choice(pool)
        for cut in range(0, len(text) + 1, 3):
            piece = bytes(text[:cut])
            assert fast_status(constraint.grammar, piece) == reference.status(piece), piece
            checked += 1
    assert checked > 2000


def test_mask_matches_reference(constraint, reference, small_tokenizer):
    rng = random.Random(1)
    prefixes = random_walk_prefixes(constraint, small_tokenizer, rng, walks=12)
    prefixes = rng.sample(prefixes, 45)
    for call in VALID_CALLS:  # cuts at token boundaries of the text a trained model writes
        ids = small_tokenizer.encode(call_text(call))
        prefixes += [small_tokenizer.decode(ids[:cut]).encode() for cut in
                     sorted(rng.sample(range(len(ids) + 1), 4))]
    data = token_bytes(small_tokenizer)
    for prefix in prefixes:
        state = constraint.grammar.advance(constraint.start, prefix)
        assert state is not None, prefix
        fast = set(constraint.allowed_ids(state))
        slow = reference_allowed(reference, constraint, small_tokenizer, prefix)
        assert fast, prefix
        assert fast == slow, (prefix, [data[token] for token in fast ^ slow][:10])
        for token in fast:  # the mask and the per-token check agree
            assert constraint.advance(state, token) is not None


def test_min_completion_is_shortest_completion(small_tokenizer):
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 3, "minLength": 1},
        "unit": {"enum": ["c", "fahrenheit", 7]},
        "days": {"type": "integer", "minimum": 10, "maximum": 14},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3},
        "opts": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
        "note": {"type": ["string", "null"]}, "any": {}}, "required": ["city", "opts"]}},
        {"name": "g_long_name", "parameters": {"type": "object", "properties": {
            "n": {"type": "number"}}, "required": ["n"]}}]
    constraint = ToolCallConstraint(tools, small_tokenizer)
    grammar = constraint.grammar
    alphabet = sorted(set(b'{}[],:. "-0123456789truefalsn\\u') | {0x80, 0x90, 0xA0}
                      | set(json.dumps(tools).encode()))

    def shortest(state) -> int:
        """Breadth-first search over single bytes to the closing brace."""
        frontier, seen, distance = [state], {state}, 0
        while frontier:
            if any(grammar.is_complete(item) for item in frontier):
                return distance
            following = []
            for item in frontier:
                for byte in alphabet:
                    after = grammar.advance(item, bytes([byte]))
                    if after is not None and after not in seen:
                        seen.add(after)
                        following.append(after)
            frontier, distance = following, distance + 1
        raise AssertionError("no completion")

    rng = random.Random(2)
    prefixes = random_walk_prefixes(constraint, small_tokenizer, rng, walks=10)
    prefixes += [b'{"name": "f", "arguments": {"city": "\xe2', b'{"name": "f", "arguments": '
                 b'{"city": "a\\u00', b'{"name": "f", "arguments": {"tags": ["', b'{"na']
    for prefix in rng.sample(prefixes, 40):
        state = grammar.advance(grammar.start, prefix)
        if grammar.min_completion(state) > 24:
            continue  # keep the search small
        assert grammar.min_completion(state) == shortest(state), prefix


@pytest.mark.parametrize("schema, prefixes", [
    ({"type": "integer", "minimum": 1024, "maximum": 65535},
     ["", "-", "0", "1", "10", "102", "1023", "6", "65", "655", "6553", "65536", "7"]),
    ({"type": "integer", "exclusiveMinimum": -12.5, "maximum": -3},
     ["", "-", "-1", "-12", "-13", "-3", "-2", "-4", "1"]),
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1},
     ["", "-", "0", "0.", "0.0", "0.000", "1", "1.", "1.0", "1.01", "2", "-0."]),
    ({"type": "number", "minimum": -2.25, "exclusiveMaximum": 2.5},
     ["", "-", "-0", "-0.", "-2", "-2.2", "-2.25", "-2.3", "-3", "2", "2.4", "2.5", "3"]),
    ({"type": "number", "minimum": 99.5},
     ["", "-", "0", "9", "99", "99.", "99.4", "99.5", "100", "1"]),
])
def test_bounded_number_rest_matches_search(schema, prefixes):
    integer = schema["type"] == "integer"
    node = ToolCallGrammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "v": schema}}}]).arguments[0].values[0]
    assert isinstance(node, _NumberNode)
    alphabet = "0123456789" if integer else "0123456789."
    schema_text = json.dumps(schema, sort_keys=True)

    def beyond_bounds(text: str) -> bool:
        """Whether no extension can come back in range: more characters only move a positive
        number up and a negative number down."""
        digits = text.rstrip(".")
        if digits in ("", "-", "-0"):
            return False
        value = Fraction(digits)
        if value >= 0:
            return ("maximum" in schema and value > Fraction(repr(schema["maximum"]))) or (
                "exclusiveMaximum" in schema
                and value >= Fraction(repr(schema["exclusiveMaximum"])))
        return ("minimum" in schema and value < Fraction(repr(schema["minimum"]))) or (
            "exclusiveMinimum" in schema
            and value <= Fraction(repr(schema["exclusiveMinimum"])))

    def search(text: str) -> int | None:
        """Breadth-first search over appended characters, up to 4 of them."""
        level = [text]
        for extra in range(5):
            if any(number_complete(item, schema_text, integer) for item in level):
                return extra
            level = [item + char for item in level for char in alphabet
                     if not beyond_bounds(item + char) and (item + char).count(".") < 2
                     and not LEADING_ZERO.match(item + char)]
        return None

    for prefix in prefixes:
        expected = search(prefix)
        if expected is None and node.rest(prefix.encode()) is not None:
            assert node.rest(prefix.encode()) >= 5, prefix  # beyond the search depth
            continue
        assert node.rest(prefix.encode()) == expected, prefix


def test_unsupported_keywords_are_listed():
    grammar = ToolCallGrammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^a"},
        "u": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "n": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}}])
    assert grammar.unenforced == [
        "f: parameters.s: keyword 'pattern' is not enforced",
        "f: parameters.u: keyword 'uniqueItems' is not enforced",
        "f: parameters.n: alternatives that start with the same character are not enforced; "
        "any JSON value is allowed"]
    assert ToolCallGrammar(TOOLS).unenforced == []


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength 2 is below minLength 3"),
    ({"type": "integer", "minimum": 2, "maximum": 1}, "no integer lies in the range"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
     "no integer lies in the range"),
    ({"type": "string", "enum": [1, 2]}, "no enum or const value is valid"),
    ({"type": "array", "minItems": 2, "maxItems": 1}, "maxItems 1 is below minItems 2"),
])
def test_unsatisfiable_schema_raises(schema, message):
    with pytest.raises(CodelingError, match=message):
        ToolCallGrammar([{"name": "f", "parameters": {"type": "object",
                                                      "properties": {"v": schema}}}])


def test_token_bytes_match_decode(small_tokenizer):
    data = token_bytes(small_tokenizer)
    assert all(data[index] is None for index in range(16))
    assert len(data) == small_tokenizer.vocab_size
    decoded = 0
    for token_id, piece in enumerate(data[16:], start=16):
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert text == small_tokenizer.decode([token_id])
        decoded += 1
    assert decoded > 300  # single bytes 0x80-0xFF are not UTF-8 on their own
    assert {bytes([byte]) for byte in range(256)} <= set(data)


# -- generation with a tiny random-weight model --------------------------------------------------


@pytest.fixture
def one_thread():
    """Decode tiny models on one thread: two threads on a busy 2-core machine are 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_generator(small_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(arch="dense", vocab_size=small_tokenizer.vocab_size, d_model=32,
                         n_layers=2, n_heads=2, max_seq_len=2048)
    return Generator(CodeModel(config), small_tokenizer, torch.device("cpu"), bf16=False)


def eager_generator(tokenizer, token: str, boost: float) -> Generator:
    """Build a random tiny model that writes `token` with high probability at every step.

    Every embedding gets a shared large component on dimension 0, so the final hidden state
    points along it whatever the input. The untied output row of `token` reads that dimension.
    """
    torch.manual_seed(0)
    config = ModelConfig(arch="dense", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, max_seq_len=2048, tie_embeddings=False)
    model = CodeModel(config)
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] += 1.0
        model.lm_head.weight[tokenizer.token_id(token), 0] = boost
    return Generator(model, tokenizer, torch.device("cpu"), bf16=False)


def call_prompt(tokenizer, tools=TOOLS) -> list[int]:
    """A chat prompt whose assistant turn starts with <|tool_call|>."""
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    return chat.render(messages, tokenizer, tools=tools) + [tokenizer.token_id("<|tool_call|>")]


def generated_calls(tokenizer, ids: list[int], prefilled: bool = True) -> list[dict]:
    prefix = [tokenizer.token_id("<|tool_call|>")] if prefilled else []
    return chat.parse_assistant(prefix + ids, tokenizer).get("tool_calls", [])


def test_constrained_calls_always_valid(tiny_generator, small_tokenizer, one_thread):
    prompt = call_prompt(small_tokenizer)
    names = set()
    for seed in range(20):
        config = GenerationConfig(max_new_tokens=70, temperature=1.0, top_p=1.0, seed=seed)
        ids = tiny_generator.generate_turn(prompt, config, TOOLS, constrained=True)
        assert 0 < len(ids) <= 70
        calls = generated_calls(small_tokenizer, ids)
        assert calls, small_tokenizer.decode(ids)
        for call in calls:
            assert validate_call(call, TOOLS) == [], small_tokenizer.decode(ids)
            names.add(call["function"]["name"])
    assert len(names) >= 3  # sampling reaches different tools


def test_unconstrained_calls_are_garbage(tiny_generator, small_tokenizer, one_thread):
    prompt = call_prompt(small_tokenizer)
    valid = 0
    for seed in range(20):
        config = GenerationConfig(max_new_tokens=70, temperature=1.0, top_p=1.0, seed=seed)
        ids = tiny_generator.generate_turn(prompt, config, TOOLS, constrained=False)
        calls = generated_calls(small_tokenizer, ids)
        valid += all(validate_call(call, TOOLS) == [] for call in calls)
    assert valid == 0


def test_greedy_constrained_call_is_valid(tiny_generator, small_tokenizer, one_thread):
    config = GenerationConfig(max_new_tokens=70, temperature=0.0)
    ids = tiny_generator.generate_turn(call_prompt(small_tokenizer), config, TOOLS,
                                       constrained=True)
    calls = generated_calls(small_tokenizer, ids)
    assert calls
    assert all(validate_call(call, TOOLS) == [] for call in calls)


def test_call_fits_smallest_budget(tiny_generator, small_tokenizer, one_thread):
    constraint = tiny_generator.tool_call_constraint(TOOLS)
    budget = constraint.min_call_tokens
    assert budget == len(call_text({"name": "noop", "arguments": {}}).encode())
    prompt = call_prompt(small_tokenizer)
    for seed in range(3):
        config = GenerationConfig(max_new_tokens=budget, temperature=1.0, seed=seed)
        ids = tiny_generator.generate_turn(prompt, config, TOOLS, constrained=True)
        calls = generated_calls(small_tokenizer, ids)
        assert [validate_call(call, TOOLS) for call in calls] == [[]]
    with pytest.raises(CodelingError, match="raise max_new_tokens"):
        tiny_generator.generate_turn(prompt, GenerationConfig(max_new_tokens=budget - 1), TOOLS,
                                     constrained=True)


def test_free_text_then_constrained_calls(small_tokenizer, one_thread):
    generator = eager_generator(small_tokenizer, "<|tool_call|>", boost=0.7)
    messages = [{"role": "user", "content": "Weather in Oslo and Rome?"}]
    prompt = chat.render(messages, small_tokenizer, tools=TOOLS)
    tool_call = small_tokenizer.token_id("<|tool_call|>")
    turns_with_text = 0
    for seed in range(6):
        config = GenerationConfig(max_new_tokens=120, temperature=1.0, seed=seed)
        ids = generator.generate_turn(prompt, config, TOOLS, constrained=True)
        assert tool_call in ids
        message = chat.parse_assistant(ids, small_tokenizer)
        turns_with_text += bool(message["content"])
        assert "<|" not in message["content"]
        for call in message["tool_calls"]:
            assert validate_call(call, TOOLS) == [], small_tokenizer.decode(ids)
    assert turns_with_text >= 1


def test_tool_call_banned_without_tools(small_tokenizer, one_thread):
    generator = eager_generator(small_tokenizer, "<|tool_call|>", boost=3.0)
    prompt = chat.render([{"role": "user", "content": "Hi"}], small_tokenizer)
    config = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=0)
    ids = generator.generate_turn(prompt, config, None, constrained=True)
    assert len(ids) == 30
    assert all(token >= 16 for token in ids)


def test_turn_stops_at_end_turn(small_tokenizer, one_thread):
    generator = eager_generator(small_tokenizer, "<|end_turn|>", boost=0.5)
    prompt = chat.render([{"role": "user", "content": "Hi"}], small_tokenizer)
    ids = generator.generate_turn(prompt, GenerationConfig(max_new_tokens=200, seed=0))
    assert len(ids) < 200
    assert generator.last_usage["completion_tokens"] == len(ids) + 1
    assert small_tokenizer.token_id("<|end_turn|>") not in ids


def test_stream_turn_matches_generate_turn(small_tokenizer, one_thread):
    generator = eager_generator(small_tokenizer, "<|tool_call|>", boost=0.7)
    prompt = chat.render([{"role": "user", "content": "Weather?"}], small_tokenizer, tools=TOOLS)
    config = GenerationConfig(max_new_tokens=120, temperature=1.0, seed=3)
    ids = generator.generate_turn(prompt, config, TOOLS, constrained=True)
    events = list(generator.stream_turn(prompt, config, TOOLS, constrained=True))
    message = chat.parse_assistant(ids, small_tokenizer)
    text = "".join(piece for kind, piece in events if kind == "text")
    calls = [json.loads(piece) for kind, piece in events if kind == "tool_call"]
    assert text == message["content"]
    assert calls == [call["function"] for call in message["tool_calls"]]
    assert calls


def test_generate_turn_rejects_bad_prompts(tiny_generator):
    with pytest.raises(CodelingError, match="prompt is empty"):
        tiny_generator.generate_turn([], GenerationConfig())
    with pytest.raises(CodelingError, match="context is 2048"):
        tiny_generator.generate_turn([1] * 2048, GenerationConfig())


# -- speed ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_4096(stdlib_sample):
    return train_tokenizer(stdlib_sample[:len(stdlib_sample) // 3], vocab_size=4096)


@pytest.mark.parametrize("vocab", ["small", "4096"])
def test_mask_speed(vocab, small_tokenizer, tokenizer_4096):
    """Time the uncached mask over the states of random calls; print the milliseconds."""
    tokenizer = small_tokenizer if vocab == "small" else tokenizer_4096
    constraint = ToolCallConstraint(TOOLS, tokenizer)
    prefixes = random_walk_prefixes(constraint, tokenizer, random.Random(3), walks=10)
    times = []
    for prefix in prefixes:
        state = constraint.grammar.advance(constraint.start, prefix)
        constraint._cache.clear()
        start = time.perf_counter()
        constraint.allowed_ids(state)
        times.append((time.perf_counter() - start) * 1000)
    print(f"\nvocab {tokenizer.vocab_size}: {len(times)} states, uncached mask mean "
          f"{statistics.mean(times):.2f} ms, max {max(times):.2f} ms")
    assert statistics.mean(times) < 50
