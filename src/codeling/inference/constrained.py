"""Constrained decoding of tool calls: the model may only pick tokens that keep its call valid.

After `<|tool_call|>` the model writes one JSON object,

    {"name": NAME, "arguments": ARGUMENTS}

and the constraint makes NAME one of the listed tools and ARGUMENTS an object valid against that
tool's `parameters` schema, in the layout of `json.dumps(value, ensure_ascii=False)`: ", " and
": " separators, no other whitespace, no escapes beyond the ones json.dumps writes. After the
closing brace only `<|tool_call|>` (another call) or `<|end_turn|>` may follow.

`ToolCallGrammar` is a pushdown automaton over the UTF-8 bytes of that text. A state is an
immutable stack of frames, one per open JSON value, written as nested tuples (frame, parent), so
candidate tokens can share a state and states can be cache keys. The automaton accepts a byte
only when the text so far can still be completed, so a model never reaches a dead end, and
`min_completion` returns the exact number of bytes still needed to close the call.

`ToolCallConstraint` lifts the grammar to tokens. It walks a trie of the tokenizer's token bytes
from a state and drops a whole subtree as soon as the grammar rejects its prefix. The allowed ids
are cached per state. Byte-level tokens that split a UTF-8 character are handled like any other
bytes, so every character stays writable.

Supported JSON Schema (each value the constraint lets through validates):
- object: `properties` (only these keys, each at most once, in any order; additionalProperties
  is taken as false), `required`; without properties, any keys with values from a schema-valued
  `additionalProperties`;
- string: `minLength`, `maxLength` (in code points, as jsonschema counts);
- integer and number: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (a bounded
  number is written without an exponent);
- boolean, null, `enum` and `const` of any JSON values;
- array: `items` (one schema), `minItems`, `maxItems`;
- a list of types, `anyOf` and `oneOf`, when the alternatives start with different characters.
Any other schema allows any JSON value, and each keyword that restricts values but is not
enforced (such as `pattern` or `uniqueItems`) is listed in `ToolCallGrammar.unenforced`.
"""

from __future__ import annotations

import bisect
import json
import math
import weakref
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Callable

import jsonschema
import torch

from codeling.errors import CodelingError
from codeling.inference.sampling import sample_next
from codeling.inference.tool_calls import tool_specs
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer

# A state: (frame, parent state or None). A frame is a tuple whose first item is its step function.
State = tuple

_QUOTE, _BACKSLASH, _COMMA, _COLON, _SPACE = 0x22, 0x5C, 0x2C, 0x3A, 0x20
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET, _MINUS = 0x7B, 0x7D, 0x5B, 0x5D, 0x2D
_DIGITS = frozenset(b"0123456789")
_NUMBER_STARTS = frozenset(b"-0123456789")

# Keywords that restrict values but are not enforced by the constraint.
UNENFORCED_KEYWORDS = (
    "pattern", "multipleOf", "uniqueItems", "minProperties", "maxProperties",
    "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
    "not", "allOf", "if", "then", "else", "$ref", "$dynamicRef", "contains", "minContains",
    "maxContains", "prefixItems", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
)
# Keywords that only annotate a schema; they never change which values are valid.
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$schema", "$id",
                          "$comment", "format", "deprecated", "readOnly", "writeOnly",
                          "contentMediaType", "contentEncoding", "$defs", "definitions"})
# The maximum extension, in bytes, searched for when a bounded number is completed.
_MAX_NUMBER_REST = 40


def _step(state: State, byte: int) -> State | None:
    frame = state[0]
    return frame[0](frame, state[1], byte)


# -- literal tries -------------------------------------------------------------------------------


class _Trie:
    """A trie over byte strings; a node where a string ends carries its payload.

    `mask` has bit i set for every payload i at or below the node, and `rest` is the minimum over
    those strings of (bytes left after this node + the string's extra cost).
    """

    __slots__ = ("children", "payload", "mask", "depth", "rest")

    def __init__(self, depth: int):
        self.children: dict[int, _Trie] = {}
        self.payload: int | None = None
        self.mask = 0
        self.depth = depth
        self.rest = math.inf


def _build_trie(entries: Sequence[tuple[bytes, int, int]]) -> _Trie:
    """Build a trie from (text, payload, extra cost) entries; payloads must be distinct ints."""
    root = _Trie(0)
    for text, payload, extra in entries:
        node = root
        path = [root]
        for byte in text:
            node = node.children.setdefault(byte, _Trie(node.depth + 1))
            path.append(node)
        node.payload = payload
        for step in path:
            step.mask |= 1 << payload
            step.rest = min(step.rest, len(text) - step.depth + extra)
    return root


# -- schema nodes --------------------------------------------------------------------------------


class _Node:
    """A compiled schema. `start` consumes a value's first byte, `min_len` is its shortest text."""

    min_len: int = 1
    first_bytes: frozenset[int] = frozenset()

    def start(self, byte: int, parent: State) -> State | None:
        raise NotImplementedError


class _AnyNode(_Node):
    """Any JSON value."""

    min_len = 1  # "0"

    def __init__(self) -> None:
        self.literals = _LiteralNode([b"true", b"false", b"null"])
        self.first_bytes = frozenset(b'{["-0123456789tfn')

    def start(self, byte: int, parent: State) -> State | None:
        if byte == _LBRACE:
            return ANY_OBJECT.start(byte, parent)
        if byte == _LBRACKET:
            return ANY_ARRAY.start(byte, parent)
        if byte == _QUOTE:
            return ANY_STRING.start(byte, parent)
        if byte in _NUMBER_STARTS:
            return ANY_NUMBER.start(byte, parent)
        return self.literals.start(byte, parent)


class _LiteralNode(_Node):
    """One of a fixed set of JSON texts: enum, const, true/false, null."""

    def __init__(self, texts: Sequence[bytes]):
        self.trie = _build_trie([(text, index, 0) for index, text in enumerate(texts)])
        self.min_len = min(len(text) for text in texts)
        self.first_bytes = frozenset(text[0] for text in texts)

    def start(self, byte: int, parent: State) -> State | None:
        child = self.trie.children.get(byte)
        return None if child is None else ((_step_literal, child), parent)


def _step_literal(frame: tuple, parent: State, byte: int) -> State | None:
    node: _Trie = frame[1]
    child = node.children.get(byte)
    if child is not None:
        return ((_step_literal, child), parent)
    # A complete literal that is a prefix of another one ("1" of [1, 12]) ends at the next byte.
    return _step(parent, byte) if node.payload is not None else None


class _StringNode(_Node):
    """A JSON string with optional minLength and maxLength in code points."""

    def __init__(self, min_length: int = 0, max_length: int | None = None):
        self.min_length = min_length
        self.max_length = max_length
        # Without bounds the count stays 0, so all states inside the string are equal (cacheable).
        self.counts = min_length > 0 or max_length is not None
        self.min_len = 2 + min_length
        self.first_bytes = frozenset({_QUOTE})

    def start(self, byte: int, parent: State) -> State | None:
        return ((_step_string, self, 0, 0, 0, 0, 0), parent) if byte == _QUOTE else None


# UTF-8 lead bytes: (continuation bytes, allowed range of the first continuation byte). The
# narrowed ranges exclude overlong forms, UTF-16 surrogates and code points above U+10FFFF.
_UTF8_LEADS: dict[int, tuple[int, int, int]] = {}
for _lead in range(0xC2, 0xE0):
    _UTF8_LEADS[_lead] = (1, 0x80, 0xBF)
for _lead in range(0xE0, 0xF0):
    _UTF8_LEADS[_lead] = (2, 0x80, 0xBF)
_UTF8_LEADS[0xE0] = (2, 0xA0, 0xBF)
_UTF8_LEADS[0xED] = (2, 0x80, 0x9F)
for _lead in range(0xF0, 0xF5):
    _UTF8_LEADS[_lead] = (3, 0x80, 0xBF)
_UTF8_LEADS[0xF0] = (3, 0x90, 0xBF)
_UTF8_LEADS[0xF4] = (3, 0x80, 0x8F)

# Escapes as json.dumps writes them: \" \\ \b \f \n \r \t, and \u00XX (lowercase hex) for the
# other control characters. Escape phase -> {byte: next phase}; phase 0 means the escape is done.
_ESCAPES: dict[int, dict[int, int]] = {
    1: {**{byte: 0 for byte in b'"\\bfnrt'}, ord("u"): 2},
    2: {ord("0"): 3},
    3: {ord("0"): 4},
    4: {ord("0"): 5, ord("1"): 6},
    5: {byte: 0 for byte in b"01234567bef"},  # \u0000-\u001f less \b \t \n \f \r
    6: {byte: 0 for byte in b"0123456789abcdef"},
}
_ESCAPE_REST = {0: 0, 1: 1, 2: 4, 3: 3, 4: 2, 5: 1, 6: 1}


def _step_string(frame: tuple, parent: State, byte: int) -> State | None:
    _, node, count, need, low, high, escape = frame
    if escape:
        following = _ESCAPES[escape].get(byte)
        return None if following is None else ((_step_string, node, count, 0, 0, 0, following),
                                                parent)
    if need:
        if not low <= byte <= high:
            return None
        return ((_step_string, node, count, need - 1, 0x80, 0xBF, 0), parent)
    if byte == _QUOTE:
        return parent if count >= node.min_length else None
    if byte < 0x20:
        return None  # control characters must be escaped
    if node.counts:
        if node.max_length is not None and count >= node.max_length:
            return None
        count += 1
    if byte == _BACKSLASH:
        return ((_step_string, node, count, 0, 0, 0, 1), parent)
    if byte < 0x80:
        return ((_step_string, node, count, 0, 0, 0, 0), parent)
    lead = _UTF8_LEADS.get(byte)
    if lead is None:
        return None
    return ((_step_string, node, count, lead[0], lead[1], lead[2], 0), parent)


def _string_cost(frame: tuple) -> int:
    _, node, count, need, _, _, escape = frame
    return _ESCAPE_REST[escape] + need + max(0, node.min_length - count) + 1


class _NumberNode(_Node):
    """A JSON integer or number, with optional bounds (Fractions; integers use inclusive ints)."""

    def __init__(self, integer: bool, low: Fraction | None = None, low_open: bool = False,
                 high: Fraction | None = None, high_open: bool = False):
        self.integer = integer
        if integer:
            # Turn the bounds into the inclusive bounds of the integers they allow.
            if low is not None:
                low, low_open = Fraction(math.floor(low) + 1 if low_open else math.ceil(low)), False
            if high is not None:
                high, high_open = (Fraction(math.ceil(high) - 1 if high_open else math.floor(high)),
                                   False)
        self.low, self.low_open, self.high, self.high_open = low, low_open, high, high_open
        self.bounded = low is not None or high is not None
        self._rest_cache: dict[bytes, int | None] = {}
        self.first_bytes = _NUMBER_STARTS
        if not self.bounded:
            self.min_len = 1
        else:
            positive, negative = self.rest(b""), self.rest(b"-")
            lengths = [*([positive] if positive is not None else []),
                       *([negative + 1] if negative is not None else [])]
            if not lengths:
                raise CodelingError("no number lies in the range")
            self.min_len = min(lengths)

    def start(self, byte: int, parent: State) -> State | None:
        phase = _NUMBER_START.get(byte)
        if phase is None:
            return None
        text = bytes([byte]) if self.bounded else b""
        if self.bounded and self.rest(text) is None:
            return None
        return ((_step_number, self, phase, text), parent)

    def rest(self, text: bytes) -> int | None:
        """Return the fewest bytes that make `text` a number in range, or None if none do."""
        cached = self._rest_cache.get(text, -1)
        if cached != -1:
            return cached
        if len(self._rest_cache) > 100_000:
            self._rest_cache.clear()
        result = _shortest_number_rest(self, text)
        self._rest_cache[text] = result
        return result


# Number grammar phases; json.dumps writes floats such as 1.5, 1e-05, 1e+16 and -0.0.
(_N_MINUS, _N_ZERO, _N_MINUS_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_EXP, _N_EXP_SIGN,
 _N_EXP_DIGITS) = range(9)
_NUMBER_START = {_MINUS: _N_MINUS, ord("0"): _N_ZERO, **{byte: _N_INT for byte in b"123456789"}}
_NUMBER_MOVES: dict[int, dict[int, int]] = {
    _N_MINUS: {ord("0"): _N_MINUS_ZERO, **{byte: _N_INT for byte in b"123456789"}},
    _N_ZERO: {ord("."): _N_DOT, ord("e"): _N_EXP},
    _N_MINUS_ZERO: {ord("."): _N_DOT},  # "-0" is not what json.dumps writes; "-0.0" is
    _N_INT: {**{byte: _N_INT for byte in _DIGITS}, ord("."): _N_DOT, ord("e"): _N_EXP},
    _N_DOT: {byte: _N_FRAC for byte in _DIGITS},
    _N_FRAC: {**{byte: _N_FRAC for byte in _DIGITS}, ord("e"): _N_EXP},
    _N_EXP: {ord("+"): _N_EXP_SIGN, ord("-"): _N_EXP_SIGN},
    _N_EXP_SIGN: {byte: _N_EXP_DIGITS for byte in _DIGITS},
    _N_EXP_DIGITS: {byte: _N_EXP_DIGITS for byte in _DIGITS},
}
_NUMBER_FINAL = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXP_DIGITS})
_NUMBER_REST = {_N_MINUS: 1, _N_MINUS_ZERO: 2, _N_DOT: 1, _N_EXP: 2, _N_EXP_SIGN: 1}
_FRACTION_BYTES = frozenset(b".e")


def _step_number(frame: tuple, parent: State, byte: int) -> State | None:
    _, node, phase, text = frame
    following = _NUMBER_MOVES[phase].get(byte)
    if following is not None and not (node.integer and byte in _FRACTION_BYTES) \
            and not (node.bounded and byte == ord("e")) \
            and not (node.integer and following == _N_MINUS_ZERO):
        if not node.bounded:
            return ((_step_number, node, following, text), parent)
        longer = text + bytes([byte])
        if node.rest(longer) is not None:
            return ((_step_number, node, following, longer), parent)
    # Any other byte ends the number, which must be complete; the parent then consumes the byte.
    if phase in _NUMBER_FINAL and (not node.bounded or node.rest(text) == 0):
        return _step(parent, byte)
    return None


def _number_cost(frame: tuple) -> int:
    _, node, phase, text = frame
    if node.bounded:
        return node.rest(text)
    return 0 if phase in _NUMBER_FINAL else _NUMBER_REST[phase]


def _has_multiple(low: Fraction, low_open: bool, high: Fraction | None, high_open: bool,
                    digits: int) -> bool:
    """Return True if a multiple of 10**-digits lies between low and high (None: no upper bound)."""
    scale = 10 ** digits
    scaled = low * scale
    if low_open and scaled == math.floor(scaled):
        first = math.floor(scaled) + 1
    else:
        first = math.ceil(scaled)
    if high is None:
        return True
    value = Fraction(first, scale)
    return value < high or (value == high and not high_open)


def _shortest_number_rest(node: _NumberNode, text: bytes) -> int | None:
    """Return the fewest bytes that complete a bounded number prefix (no exponent) in range.

    The magnitude m of a completion lies in a half-open interval [a, b) that the prefix still
    reaches. After j more integer digits that is [p*10^j, (p+1)*10^j), and once the prefix has
    a dot and k fraction digits it is [x, x + 10^-k). A completion with f fraction digits is a
    multiple of 10^-f in such an interval that also lies in the allowed range of m.

    NOTE: Bounds are compared as exact decimals, but jsonschema compares Python floats. A
    number with more than 17 significant digits at an exclusive bound can pass here and fail
    there, because its float rounds onto the bound.
    """
    negative = text.startswith(b"-")
    body = text[1:] if negative else text
    # The allowed range of the magnitude m = |value|.
    if negative:
        low = None if node.high is None else -node.high
        low_open = node.high_open
        high = None if node.low is None else -node.low
        high_open = node.low_open
        if low is None or low < 0 or (low == 0):
            low, low_open = Fraction(0), True  # a negative number is not zero
    else:
        low, low_open, high, high_open = node.low, node.low_open, node.high, node.high_open
        if low is None or low < 0:
            low, low_open = Fraction(0), False
    if high is not None and (high < low or (high == low and (high_open or low_open))):
        return None

    def fits(a: Fraction, b: Fraction, digits: int) -> bool:
        """Return True if [a, b) contains a multiple of 10**-digits inside the allowed range."""
        if a > low:
            start, start_open = a, False
        elif a < low:
            start, start_open = low, low_open
        else:
            start, start_open = a, low_open
        if high is None or b <= high:
            end, end_open = b, True
        else:
            end, end_open = high, high_open
        if start > end or (start == end and (start_open or end_open)):
            return False
        return _has_multiple(start, start_open, end, end_open, digits)

    best: int | None = None
    if b"." in body:
        whole, fraction = body.split(b".")
        digits = len(fraction)
        start = int(whole) + Fraction(int(fraction or b"0"), 10 ** digits)
        for extra in range(0 if digits else 1, _MAX_NUMBER_REST):
            if fits(start, start + Fraction(1, 10 ** digits), digits + extra):
                return extra
        return None
    intervals: list[tuple[int, Fraction, Fraction]] = []  # (added integer digits, a, b)
    if body == b"0":
        intervals.append((0, Fraction(0), Fraction(1)))
    else:
        prefix = int(body) if body else None
        for added in range(0 if body else 1, _MAX_NUMBER_REST):
            if prefix is None:
                a = Fraction(0) if added == 1 else Fraction(10 ** (added - 1))
                b = Fraction(10 ** added)
            else:
                a, b = Fraction(prefix * 10 ** added), Fraction((prefix + 1) * 10 ** added)
            if high is not None and a > high:
                break
            intervals.append((added, a, b))
    for added, a, b in intervals:
        if best is not None and added >= best:
            break
        if fits(a, b, 0):
            best = added
            continue
        if node.integer:
            continue
        for fraction_digits in range(1, _MAX_NUMBER_REST):
            cost = added + 1 + fraction_digits
            if best is not None and cost >= best:
                break
            if fits(a, b, fraction_digits):
                best = cost
                break
    return best


class _ObjectNode(_Node):
    """An object with a fixed set of keys (`properties` plus `required`), in any order."""

    def __init__(self, keys: Sequence[str], values: Sequence[_Node], required: set[str]):
        self.keys = list(keys)
        self.values = list(values)
        self.key_lengths = [len(_key_text(key)) for key in keys]
        self.required_mask = sum(1 << index for index, key in enumerate(keys) if key in required)
        self.all_mask = (1 << len(keys)) - 1
        self.trie = _build_trie([(_key_text(key), index, value.min_len)
                                 for index, (key, value) in enumerate(zip(keys, values))])
        self.min_len = 1 + self.open_cost()
        self.first_bytes = frozenset({_LBRACE})

    def start(self, byte: int, parent: State) -> State | None:
        return ((_step_object, self, _O_OPEN, 0, self.trie), parent) if byte == _LBRACE else None

    def _pair(self, index: int) -> int:
        return self.key_lengths[index] + self.values[index].min_len

    def after_cost(self, used: int) -> int:
        """Bytes to close the object after a value: ", KEY: VALUE" per missing required key."""
        cost = 1
        for index in range(len(self.keys)):
            bit = 1 << index
            if self.required_mask & bit and not used & bit:
                cost += 2 + self._pair(index)
        return cost

    def open_cost(self) -> int:
        """Bytes to close the object right after "{"."""
        if not self.required_mask:
            return 1
        return self.after_cost(0) - 2  # the first pair has no ", " before it

    def key_cost(self, trie: _Trie, used: int) -> int:
        """Bytes to close the object from inside a key at `trie`."""
        best = math.inf
        for index in range(len(self.keys)):
            bit = 1 << index
            if trie.mask & bit and not used & bit:
                best = min(best, self.key_lengths[index] - trie.depth + self.values[index].min_len
                           + self.after_cost(used | bit))
        return int(best)


def _key_text(key: str) -> bytes:
    """Return a key as it appears in the text, with its quotes and the ": " after it."""
    return (json.dumps(key, ensure_ascii=False) + ": ").encode("utf-8")


# Object phases: after "{", inside a key, after a value, after ",".
_O_OPEN, _O_KEY, _O_AFTER, _O_COMMA = range(4)


def _step_object(frame: tuple, parent: State, byte: int) -> State | None:
    _, node, phase, used, trie = frame
    if phase == _O_AFTER:
        if byte == _COMMA and node.all_mask & ~used:
            return ((_step_object, node, _O_COMMA, used, None), parent)
        if byte == _RBRACE and not node.required_mask & ~used:
            return parent
        return None
    if phase == _O_COMMA:
        return ((_step_object, node, _O_KEY, used, node.trie), parent) if byte == _SPACE else None
    if phase == _O_OPEN and byte == _RBRACE and not node.required_mask:
        return parent
    child = trie.children.get(byte)
    if child is None or not child.mask & ~used:
        return None
    if child.payload is None:
        return ((_step_object, node, _O_KEY, used, child), parent)
    used |= 1 << child.payload
    after = ((_step_object, node, _O_AFTER, used, None), parent)
    return ((_step_value, node.values[child.payload]), after)


def _object_cost(frame: tuple) -> int:
    _, node, phase, used, trie = frame
    if phase == _O_AFTER:
        return node.after_cost(used)
    if phase == _O_COMMA:
        return 1 + node.key_cost(node.trie, used)
    if phase == _O_OPEN:
        return node.open_cost()
    return node.key_cost(trie, used)


class _FreeObjectNode(_Node):
    """An object with any keys, each value matching one schema."""

    def __init__(self, value: _Node | None = None):
        self.value = value  # None: any value, set after ANY exists
        self.min_len = 2
        self.first_bytes = frozenset({_LBRACE})

    def start(self, byte: int, parent: State) -> State | None:
        return ((_step_free_object, self, _F_OPEN), parent) if byte == _LBRACE else None


# Free object phases: after "{", after a key (":" next), after ":", after a value, after ",",
# after ", " (a key's quote next).
_F_OPEN, _F_COLON, _F_SPACE, _F_AFTER, _F_COMMA, _F_QUOTE = range(6)


def _step_free_object(frame: tuple, parent: State, byte: int) -> State | None:
    _, node, phase = frame
    if phase in (_F_OPEN, _F_QUOTE) and byte == _QUOTE:
        return ((_step_string, ANY_STRING, 0, 0, 0, 0, 0),
                ((_step_free_object, node, _F_COLON), parent))
    if phase in (_F_OPEN, _F_AFTER) and byte == _RBRACE:
        return parent
    if phase == _F_COLON and byte == _COLON:
        return ((_step_free_object, node, _F_SPACE), parent)
    if phase == _F_SPACE and byte == _SPACE:
        return ((_step_value, node.value), ((_step_free_object, node, _F_AFTER), parent))
    if phase == _F_AFTER and byte == _COMMA:
        return ((_step_free_object, node, _F_COMMA), parent)
    if phase == _F_COMMA and byte == _SPACE:
        return ((_step_free_object, node, _F_QUOTE), parent)
    return None


def _free_object_cost(frame: tuple) -> int:
    _, node, phase = frame
    pair = 4 + node.value.min_len  # '"' '"' ': ' VALUE, the shortest key being ""
    return {_F_OPEN: 1, _F_COLON: 2 + node.value.min_len + 1, _F_SPACE: 1 + node.value.min_len + 1,
            _F_AFTER: 1, _F_COMMA: 1 + pair + 1, _F_QUOTE: pair + 1}[phase]


class _ArrayNode(_Node):
    """An array of items matching one schema, with optional minItems and maxItems."""

    def __init__(self, items: _Node | None = None, min_items: int = 0,
                 max_items: int | None = None):
        self.items = items  # None: any value, set after ANY exists
        self.min_items = min_items
        self.max_items = max_items
        self.first_bytes = frozenset({_LBRACKET})
        self.min_len = 2 if items is None else self.open_cost()

    def start(self, byte: int, parent: State) -> State | None:
        return ((_step_array, self, _A_OPEN, 0), parent) if byte == _LBRACKET else None

    def after_cost(self, count: int) -> int:
        missing = max(0, self.min_items - count)
        return 1 + missing * (2 + self.items.min_len)

    def open_cost(self) -> int:
        if self.min_items == 0:
            return 2
        return 1 + self.after_cost(0) - 2


# Array phases: after "[", after an item, after ",".
_A_OPEN, _A_AFTER, _A_COMMA = range(3)


def _step_array(frame: tuple, parent: State, byte: int) -> State | None:
    _, node, phase, count = frame
    if phase == _A_OPEN:
        if byte == _RBRACKET and node.min_items == 0:
            return parent
        if node.max_items == 0:
            return None
        return node.items.start(byte, ((_step_array, node, _A_AFTER, 1), parent))
    if phase == _A_AFTER:
        if byte == _COMMA and (node.max_items is None or count < node.max_items):
            return ((_step_array, node, _A_COMMA, count), parent)
        if byte == _RBRACKET and count >= node.min_items:
            return parent
        return None
    if byte == _SPACE:
        return ((_step_value, node.items), ((_step_array, node, _A_AFTER, count + 1), parent))
    return None


def _array_cost(frame: tuple) -> int:
    _, node, phase, count = frame
    if phase == _A_OPEN:
        return node.open_cost() - 1
    if phase == _A_AFTER:
        return node.after_cost(count)
    return 1 + node.items.min_len + node.after_cost(count + 1)


class _UnionNode(_Node):
    """Alternatives distinguished by the first byte of the value."""

    def __init__(self, alternatives: Sequence[_Node]):
        self.by_first: dict[int, _Node] = {}
        for alternative in alternatives:
            for byte in alternative.first_bytes:
                self.by_first[byte] = alternative
        self.first_bytes = frozenset(self.by_first)
        self.min_len = min(alternative.min_len for alternative in alternatives)

    def start(self, byte: int, parent: State) -> State | None:
        alternative = self.by_first.get(byte)
        return None if alternative is None else alternative.start(byte, parent)


def _step_value(frame: tuple, parent: State, byte: int) -> State | None:
    return frame[1].start(byte, parent)


def _step_head(frame: tuple, parent: State, byte: int) -> State | None:
    child = frame[1].children.get(byte)
    if child is None:
        return None
    if child.payload is None:
        return ((_step_head, child, frame[2]), None)
    # The call head '{"name": NAME, "arguments": ' is complete; the arguments object follows.
    return ((_step_value, frame[2][child.payload]), _TAIL)


def _step_tail(frame: tuple, parent: State, byte: int) -> State | None:
    return _DONE if byte == _RBRACE else None


def _step_done(frame: tuple, parent: State, byte: int) -> State | None:
    return None


_TAIL: State = ((_step_tail,), None)
_DONE: State = ((_step_done,), None)

_COSTS: dict[Callable, Callable[[tuple], int]] = {
    _step_value: lambda frame: frame[1].min_len,
    _step_literal: lambda frame: frame[1].rest,
    _step_string: _string_cost,
    _step_number: _number_cost,
    _step_object: _object_cost,
    _step_free_object: _free_object_cost,
    _step_array: _array_cost,
    _step_head: lambda frame: frame[1].rest,
    _step_tail: lambda frame: 1,
    _step_done: lambda frame: 0,
}

ANY = _AnyNode()
ANY_OBJECT = _FreeObjectNode(ANY)
ANY_ARRAY = _ArrayNode(ANY)
ANY_STRING = _StringNode()
ANY_NUMBER = _NumberNode(integer=False)


# -- compiling JSON Schema -----------------------------------------------------------------------


class _Compiler:
    """Compile one tool's parameters schema into nodes, noting what is not enforced."""

    def __init__(self, tool: str):
        self.tool = tool
        self.unenforced: list[str] = []

    def error(self, path: str, message: str) -> CodelingError:
        return CodelingError(f"tool {self.tool!r}: schema at {path}: {message}; fix the tool's "
                             "parameters schema")

    def note(self, path: str, message: str) -> None:
        self.unenforced.append(f"{self.tool}: {path}: {message}")

    def compile(self, schema: Any, path: str) -> _Node:
        if schema is True or schema == {}:
            return ANY
        if schema is False:
            raise self.error(path, "false allows no value")
        if not isinstance(schema, Mapping):
            raise self.error(path, f"expected a schema object, got {type(schema).__name__}")
        for keyword in UNENFORCED_KEYWORDS:
            if keyword in schema:
                self.note(path, f"keyword {keyword!r} is not enforced")
        if "enum" in schema or "const" in schema:
            return self.compile_enum(schema, path)
        if "anyOf" in schema or "oneOf" in schema:
            keyword = "anyOf" if "anyOf" in schema else "oneOf"
            others = set(schema) - _ANNOTATIONS - {keyword} - set(UNENFORCED_KEYWORDS)
            if others:
                self.note(path, f"{keyword} next to {sorted(others)} is not enforced; any JSON "
                          "value is allowed")
                return ANY
            alternatives = [self.compile(sub, f"{path}.{keyword}[{index}]")
                            for index, sub in enumerate(schema[keyword])]
            return self.union(alternatives, path)
        types = schema.get("type")
        if types is None:
            types = "object" if "properties" in schema or "required" in schema else \
                "array" if "items" in schema else None
        if types is None:
            if set(schema) - _ANNOTATIONS - set(UNENFORCED_KEYWORDS):
                self.note(path, "a schema without \"type\" allows any JSON value")
            return ANY
        if isinstance(types, list):
            if "number" in types:
                types = [kind for kind in types if kind != "integer"]
            return self.union([self.compile_type(schema, kind, path) for kind in types], path)
        return self.compile_type(schema, types, path)

    def compile_arguments(self, parameters: Mapping) -> _Node:
        """Compile a tool's parameters, which must describe a JSON object."""
        node = self.compile({"type": "object", **parameters}, "parameters")
        if node is ANY:
            return ANY_OBJECT
        if node.first_bytes != {_LBRACE}:
            raise self.error("parameters", "the arguments must be a JSON object")
        return node

    def union(self, alternatives: list[_Node], path: str) -> _Node:
        if len(alternatives) == 1:
            return alternatives[0]
        seen: set[int] = set()
        for alternative in alternatives:
            if seen & alternative.first_bytes:
                self.note(path, "alternatives that start with the same character are not "
                          "enforced; any JSON value is allowed")
                return ANY
            seen |= alternative.first_bytes
        return _UnionNode(alternatives)

    def compile_enum(self, schema: Mapping, path: str) -> _Node:
        values = [schema["const"]] if "const" in schema else list(schema["enum"])
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator)(schema)
        texts = [json.dumps(value, ensure_ascii=False).encode("utf-8")
                 for value in values if validator.is_valid(value)]
        if not texts:
            raise self.error(path, "no enum or const value is valid against the schema")
        return _LiteralNode(sorted(set(texts)))

    def compile_type(self, schema: Mapping, kind: str, path: str) -> _Node:
        if kind == "object":
            return self.compile_object(schema, path)
        if kind == "array":
            return self.compile_array(schema, path)
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            if high is not None and high < low:
                raise self.error(path, f"maxLength {high} is below minLength {low}")
            return _StringNode(low, high)
        if kind in ("integer", "number"):
            return self.compile_number(schema, kind == "integer", path)
        if kind == "boolean":
            return _LiteralNode([b"true", b"false"])
        if kind == "null":
            return _LiteralNode([b"null"])
        raise self.error(path, f"unknown type {kind!r}")

    def compile_object(self, schema: Mapping, path: str) -> _Node:
        properties = schema.get("properties")
        required = list(schema.get("required", []))
        extra = schema.get("additionalProperties", True)
        if properties is None and not required and extra is not False:
            value = self.compile(extra, f"{path}.additionalProperties") \
                if isinstance(extra, Mapping) else ANY
            return _FreeObjectNode(value)
        properties = dict(properties or {})
        for key in required:
            if key not in properties:
                if extra is False:
                    raise self.error(path, f"required key {key!r} is not in properties")
                properties[key] = True
        keys = list(properties)
        values = [self.compile(properties[key], f"{path}.{key}") for key in keys]
        return _ObjectNode(keys, values, set(required))

    def compile_array(self, schema: Mapping, path: str) -> _Node:
        items = schema.get("items", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if items is False:
            high = 0
            items = True
        if isinstance(items, list):
            self.note(path, "items as a list is not enforced; any items are allowed")
            items = True
        if high is not None and high < low:
            raise self.error(path, f"maxItems {high} is below minItems {low}")
        return _ArrayNode(self.compile(items, f"{path}[]"), low, high)

    def compile_number(self, schema: Mapping, integer: bool, path: str) -> _Node:
        low, low_open = _bound(schema.get("minimum")), False
        high, high_open = _bound(schema.get("maximum")), False
        exclusive_low = schema.get("exclusiveMinimum")
        exclusive_high = schema.get("exclusiveMaximum")
        if isinstance(exclusive_low, bool):  # draft 4: a flag on minimum
            low_open = exclusive_low
        elif exclusive_low is not None:
            bound = _bound(exclusive_low)
            if low is None or bound >= low:
                low, low_open = bound, True
        if isinstance(exclusive_high, bool):
            high_open = exclusive_high
        elif exclusive_high is not None:
            bound = _bound(exclusive_high)
            if high is None or bound <= high:
                high, high_open = bound, True
        try:
            return _NumberNode(integer, low, low_open, high, high_open)
        except CodelingError as error:
            raise self.error(path, f"no {'integer' if integer else 'number'} lies in the range "
                             f"given by minimum/maximum") from error


def _bound(value: Any) -> Fraction | None:
    """Convert a schema bound to the exact Fraction of its decimal text (0.1 is 1/10)."""
    if value is None:
        return None
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


# -- the grammar of one call ---------------------------------------------------------------------


class ToolCallGrammar:
    """The bytes of one call {"name": ..., "arguments": {...}} for a list of tools."""

    def __init__(self, tools: Sequence[Any]):
        specs = tool_specs(tools)
        if not specs:
            raise CodelingError("constrained decoding needs at least one tool; pass tools")
        self.names = list(specs)
        self.unenforced: list[str] = []
        arguments: list[_Node] = []
        for name, spec in specs.items():
            compiler = _Compiler(name)
            arguments.append(compiler.compile_arguments(spec["parameters"]))
            self.unenforced += compiler.unenforced
        heads = [(b'{"name": ' + json.dumps(name, ensure_ascii=False).encode("utf-8")
                  + b', "arguments": ', index, arguments[index].min_len + 1)
                 for index, name in enumerate(self.names)]
        self.arguments = tuple(arguments)  # the compiled parameters, in the order of names
        self.start: State = ((_step_head, _build_trie(heads), self.arguments), None)
        self.min_call_len = self.min_completion(self.start)

    @staticmethod
    def advance(state: State, data: bytes) -> State | None:
        """Feed bytes to a state; return the new state, or None if the text cannot be completed."""
        for byte in data:
            state = _step(state, byte)
            if state is None:
                return None
        return state

    @staticmethod
    def is_complete(state: State) -> bool:
        """Return True once the call's closing brace has been written."""
        return state is _DONE

    @staticmethod
    def min_completion(state: State) -> int:
        """Return the exact number of bytes in the shortest text that completes the call."""
        total = 0
        node: State | None = state
        while node is not None:
            frame = node[0]
            total += _COSTS[frame[0]](frame)
            node = node[1]
        return total


# -- tokens --------------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """Map the characters of byte-level BPE token strings back to the bytes they stand for.

    Printable Latin-1 bytes stand for themselves; the other bytes (controls, space, 0x7F-0xA0
    and 0xAD) map in order to the characters from U+0100 upwards.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(byte): byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            alphabet[chr(0x100 + extra)] = byte
            extra += 1
    return alphabet


def _plain_length(data: bytes) -> int | None:
    """Return the code points of a token that can sit anywhere inside a JSON string, else None.

    Such a token is complete UTF-8 without quotes, backslashes or control characters.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(char in '"\\' or char < " " for char in text):
        return None
    return len(text)


class _Vocabulary:
    """Token bytes of one tokenizer and tries over them: node = [children by byte, token ids].

    `root` contains every token. Inside a string, `plain_ids` (sorted by `plain_lengths`, their
    lengths in code points) are allowed whenever the string has room for them, so only the
    other tokens, in `other_root`, need a walk.
    """

    def __init__(self, tokenizer: Tokenizer):
        alphabet = _byte_level_alphabet()
        backend = tokenizer.backend
        self.size = tokenizer.vocab_size
        self.token_bytes: list[bytes | None] = []
        for token_id in range(self.size):
            piece = backend.id_to_token(token_id)
            if token_id < len(SPECIAL_TOKENS) or piece is None \
                    or any(char not in alphabet for char in piece):
                self.token_bytes.append(None)
            else:
                self.token_bytes.append(bytes(alphabet[char] for char in piece))
        self.root: list = [{}, []]
        self.other_root: list = [{}, []]
        plain: list[tuple[int, int]] = []
        for token_id, data in enumerate(self.token_bytes):
            if not data:
                continue
            _add_to_trie(self.root, data, token_id)
            length = _plain_length(data)
            if length is None:
                _add_to_trie(self.other_root, data, token_id)
            else:
                plain.append((length, token_id))
        plain.sort()
        self.plain_lengths = [length for length, _ in plain]
        self.plain_ids = [token_id for _, token_id in plain]


def _add_to_trie(root: list, data: bytes, token_id: int) -> None:
    node = root
    for byte in data:
        node = node[0].setdefault(byte, [{}, []])
    node[1].append(token_id)


_VOCABULARIES: weakref.WeakKeyDictionary[Tokenizer, _Vocabulary] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    vocabulary = _VOCABULARIES.get(tokenizer)
    if vocabulary is None:
        vocabulary = _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
    return vocabulary


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """Return the bytes each token id decodes to; None for special tokens."""
    return list(_vocabulary(tokenizer).token_bytes)


class ToolCallConstraint:
    """The tokens that keep a tool call valid, for one tokenizer and one list of tools.

    States are those of `ToolCallGrammar`; `start` is the state right after `<|tool_call|>`.
    Once the call is complete only `<|tool_call|>` and `<|end_turn|>` are allowed.
    """

    def __init__(self, tools: Sequence[Any], tokenizer: Tokenizer, cache_size: int = 4096):
        self.grammar = ToolCallGrammar(tools)
        self.vocabulary = _vocabulary(tokenizer)
        self.tool_call_id = tokenizer.token_id("<|tool_call|>")
        self.end_turn_id = tokenizer.token_id("<|end_turn|>")
        self.cache_size = cache_size
        self._cache: dict[State, list[int]] = {}

    @property
    def start(self) -> State:
        """The state right after `<|tool_call|>`."""
        return self.grammar.start

    @property
    def min_call_tokens(self) -> int:
        """An upper bound on the tokens of the shortest call: one per byte (bytes are tokens)."""
        return self.grammar.min_call_len

    def advance(self, state: State, token_id: int) -> State | None:
        """Return the state after one token, or None if the token is not allowed there."""
        if state is _DONE:
            if token_id == self.tool_call_id:
                return self.grammar.start
            return _DONE if token_id == self.end_turn_id else None
        data = self.vocabulary.token_bytes[token_id] \
            if 0 <= token_id < self.vocabulary.size else None
        return None if data is None else self.grammar.advance(state, data)

    def allowed_ids(self, state: State) -> list[int]:
        """Return the sorted ids of every token allowed in a state (cached per state)."""
        cached = self._cache.get(state)
        if cached is not None:
            return cached
        if state is _DONE:
            allowed = sorted([self.tool_call_id, self.end_turn_id])
        else:
            allowed = sorted(self._walk(state))
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[state] = allowed
        return allowed

    def _walk(self, state: State) -> list[int]:
        """Walk the token trie from a state, skipping every subtree whose prefix is rejected."""
        allowed: list[int] = []
        root = self.vocabulary.root
        frame = state[0]
        if frame[0] is _step_string and not frame[3] and not frame[6]:
            # Between characters of a string: plain tokens only need room in the string.
            _, node, count = frame[:3]
            plain_count = len(self.vocabulary.plain_ids)
            if node.max_length is not None:
                plain_count = bisect.bisect_right(self.vocabulary.plain_lengths,
                                                  node.max_length - count)
            allowed.extend(self.vocabulary.plain_ids[:plain_count])
            root = self.vocabulary.other_root
        pending = [(root[0], state)]
        while pending:
            children, current = pending.pop()
            frame, parent = current
            step = frame[0]
            for byte, (grandchildren, ids) in children.items():
                following = step(frame, parent, byte)
                if following is None:
                    continue
                if ids:
                    allowed.extend(ids)
                if grandchildren:
                    pending.append((grandchildren, following))
        return allowed

    def allowed_mask(self, state: State, size: int | None = None) -> torch.Tensor:
        """Return a bool mask (size,) that is True on allowed tokens; size defaults to the vocab."""
        mask = torch.zeros(size or self.vocabulary.size, dtype=torch.bool)
        mask[self.allowed_ids(state)] = True
        return mask

    def fits(self, state: State, remaining: int) -> bool:
        """Return True if the call can still close within `remaining` tokens (a byte each)."""
        return self.grammar.min_completion(state) <= remaining

    def pick(self, state: State, logits: torch.Tensor, temperature: float, top_k: int,
             top_p: float, generator: torch.Generator | None, remaining: int
             ) -> tuple[int, State]:
        """Choose the next token of a call from logits (V,) and return it with its new state.

        The token is allowed in `state` and leaves a call that can close within `remaining`
        further tokens. `<|tool_call|>` after a complete call also needs room for a new call.
        Greedy decoding (temperature 0) tries the 64 best tokens in descending logit order
        first. Sampling masks the logits to the allowed tokens, so top-k and top-p apply among
        those.
        """
        if temperature <= 0:
            for token_id in torch.argsort(logits, descending=True)[:64].tolist():
                following = self._check(state, token_id, remaining)
                if following is not None:
                    return token_id, following
        masked = torch.full_like(logits, float("-inf"))
        allowed = torch.tensor(self.allowed_ids(state), dtype=torch.long, device=logits.device)
        masked[allowed] = logits[allowed]
        while True:
            if not torch.isfinite(masked).any():
                raise CodelingError("constrained decoding found no allowed token; this is a bug "
                                    "in codeling.inference.constrained, please report it")
            token_id = int(sample_next(masked[None], temperature, top_k, top_p, generator)[0])
            following = self._check(state, token_id, remaining)
            if following is not None:
                return token_id, following
            masked[token_id] = float("-inf")

    def _check(self, state: State, token_id: int, remaining: int) -> State | None:
        """Return the state after a token if it is allowed and the call still fits the budget."""
        following = self.advance(state, token_id)
        if following is None or not self.fits(following, remaining):
            return None
        return following
