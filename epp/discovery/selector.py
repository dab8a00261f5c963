"""Kubernetes label selectors: `--endpoint-selector` as the Go EPP parses it (apimachinery's
`labels.Parse`), and an InferencePool's `matchLabels`.

Syntax (comma = AND; blanks around tokens are ignored):
- equality: `k=v`, `k==v`, `k!=v` (`k!=v` also matches pods without `k`);
- set-based: `k in (a,b)`, `k notin (a,b)` (`notin` also matches pods without `k`);
- existence: `k` (has the label), `!k` (has not);
- integer comparison: `k>5`, `k<5` (the label must exist and be an integer).
Keys are qualified names (`[prefix/]name`, name up to 63 characters); values are label values
(up to 63 characters, alphanumerics with `-`, `_`, `.` inside, or empty). Errors name the token
found and what was expected, in apimachinery's words.

`Selector.to_query()` is the canonical form (requirements sorted by key, set values sorted) that
the API server accepts as the `labelSelector` query parameter; `Selector.matches()` decides
membership exactly as the API server does, so the local check agrees with the server-side one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from epp.errors import PoolSpecError


class SelectorError(PoolSpecError):
    """A label selector that does not parse or names an invalid key or value."""


# Operators, with Go's `selection.Operator` spellings.
EXISTS = "exists"
DOES_NOT_EXIST = "!"
EQUALS = "="
DOUBLE_EQUALS = "=="
NOT_EQUALS = "!="
IN = "in"
NOT_IN = "notin"
GREATER_THAN = "gt"
LESS_THAN = "lt"
_BINARY = (IN, NOT_IN, EQUALS, DOUBLE_EQUALS, NOT_EQUALS, GREATER_THAN, LESS_THAN)

_NAME_MAX = 63
_PREFIX_MAX = 253
_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PREFIX_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_INT64 = (-(2**63), 2**63 - 1)

_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName', or 'my.name', or '123-abc')"
)
_PREFIX_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com')"
)
_VALUE_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'MyValue', or 'my_value', or '12345')"
)


def key_errors(key: str) -> list[str]:
    """Why `key` is not a qualified name (apimachinery's IsQualifiedName); empty when it is."""
    parts = key.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        if len(prefix) > _PREFIX_MAX:
            return [f"prefix part must be no more than {_PREFIX_MAX} bytes"]
        if not _PREFIX_RE.fullmatch(prefix):
            return ["prefix part " + _PREFIX_RULE]
    else:
        return ["a qualified name " + _NAME_RULE]
    errors = []
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > _NAME_MAX:
        errors.append(f"name part must be no more than {_NAME_MAX} bytes")
    if name and not _NAME_RE.fullmatch(name):
        errors.append("name part " + _NAME_RULE)
    return errors


def value_errors(value: str) -> list[str]:
    """Why `value` is not a label value (apimachinery's IsValidLabelValue); empty when it is."""
    errors = []
    if len(value) > _NAME_MAX:
        errors.append(f"must be no more than {_NAME_MAX} bytes")
    if not _VALUE_RE.fullmatch(value):
        errors.append(_VALUE_RULE)
    return errors


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 10, 64), or None."""
    if not _INT_RE.fullmatch(text):
        return None
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else None


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One requirement: `key` `operator` `values` (values sorted, no duplicates)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op in (IN, EQUALS, DOUBLE_EQUALS):
            return self.key in labels and labels[self.key] in self.values
        if op in (NOT_IN, NOT_EQUALS):
            return self.key not in labels or labels[self.key] not in self.values
        if op == EXISTS:
            return self.key in labels
        if op == DOES_NOT_EXIST:
            return self.key not in labels
        if op in (GREATER_THAN, LESS_THAN):
            have = _go_int(labels[self.key]) if self.key in labels else None
            want = _go_int(self.values[0]) if len(self.values) == 1 else None
            if have is None or want is None:
                return False
            return have > want if op == GREATER_THAN else have < want
        return False

    def __str__(self) -> str:
        op = self.operator
        if op == EXISTS:
            return self.key
        if op == DOES_NOT_EXIST:
            return "!" + self.key
        joined = ",".join(self.values)
        if op in (IN, NOT_IN):
            return f"{self.key} {op} ({joined})"
        symbol = {GREATER_THAN: ">", LESS_THAN: "<"}.get(op, op)
        return f"{self.key}{symbol}{joined}"


def requirement(key: str, operator: str, values: tuple[str, ...] | list[str] = ()) -> Requirement:
    """A validated Requirement (apimachinery's NewRequirement); SelectorError says what is wrong."""
    problems = [f"invalid label key {_quote(key)}: {e}" for e in key_errors(key)]
    vals = tuple(sorted(set(values)))
    if operator in (IN, NOT_IN):
        if not vals:
            problems.append("for 'in', 'notin' operators, values set can't be empty")
    elif operator in (EQUALS, DOUBLE_EQUALS, NOT_EQUALS):
        if len(vals) != 1:
            problems.append("exact-match compatibility requires one single value")
    elif operator in (EXISTS, DOES_NOT_EXIST):
        if vals:
            problems.append("values set must be empty for exists and does not exist")
    elif operator in (GREATER_THAN, LESS_THAN):
        if len(vals) != 1:
            problems.append("for 'Gt', 'Lt' operators, exactly one value is required")
        problems += [
            f"invalid value {_quote(v)}: for 'Gt', 'Lt' operators, the value must be an integer"
            for v in vals
            if _go_int(v) is None
        ]
    else:
        problems.append(f"unsupported operator {operator!r} (use one of {', '.join(_BINARY)}, !, or none)")
    for v in vals:
        problems += [f"invalid value {_quote(v)} for label {_quote(key)}: {e}" for e in value_errors(v)]
    if problems:
        raise SelectorError("; ".join(problems))
    return Requirement(key, operator, vals)


@dataclass(frozen=True, slots=True)
class Selector:
    """A conjunction of requirements, kept sorted so equal selectors compare and print equal."""

    requirements: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "requirements", tuple(sorted(self.requirements)))

    @classmethod
    def parse(cls, text: str) -> Selector:
        """The selector `text` means, as `labels.Parse` reads it (SelectorError if it does not parse)."""
        return cls(tuple(_Parser(text).parse()))

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Selector:
        """`matchLabels`: every label present with that value (validated like the API server does)."""
        return cls(tuple(requirement(k, EQUALS, (v,)) for k, v in labels.items()))

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def to_query(self) -> str:
        """The canonical text, as the `labelSelector` query parameter (Go's Selector.String())."""
        return ",".join(str(r) for r in self.requirements)

    def __str__(self) -> str:
        return self.to_query()


def _quote(text: str) -> str:
    """Go's %q for the usual cases (printable text in double quotes, escapes for the rest)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def parse_selector(text: str, what: str = "endpoint-selector") -> Selector:
    """A flag's selector; the error reads like the Go EPP's: `invalid endpoint-selector "…": …`.

    Unlike Go, a selector with no requirement (blank text) is refused: it would select every pod
    in the namespace, which is never what a flag that narrows the endpoint set means."""
    try:
        selector = Selector.parse(text)
    except SelectorError as exc:
        raise SelectorError(f"invalid {what} {_quote(text)}: {exc}") from None
    if selector.empty:
        raise SelectorError(
            f"invalid {what} {_quote(text)}: no requirement given (it would select every pod); "
            "use e.g. app=vllm or 'app in (vllm,sglang),tier!=canary'"
        )
    return selector


# -- the parser: apimachinery's lexer and recursive descent, with its error messages --------------

_EOS, _ID, _OPEN, _CLOSE, _COMMA, _NOT, _EQ, _DEQ, _NEQ, _GT, _LT, _IN, _NOTIN = range(13)
_SPECIAL = frozenset("=!(),><")
_BLANK = frozenset(" \t\r\n")
_SYMBOLS = {
    ")": _CLOSE,
    ",": _COMMA,
    "!": _NOT,
    "==": _DEQ,
    "=": _EQ,
    ">": _GT,
    "<": _LT,
    "!=": _NEQ,
    "(": _OPEN,
}
_KEYWORDS = {"in": _IN, "notin": _NOTIN}
_OPERATOR_OF = {
    _IN: IN,
    _NOTIN: NOT_IN,
    _EQ: EQUALS,
    _DEQ: DOUBLE_EQUALS,
    _NEQ: NOT_EQUALS,
    _GT: GREATER_THAN,
    _LT: LESS_THAN,
}


def _lex(text: str) -> list[tuple[int, str]]:
    tokens: list[tuple[int, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _BLANK:
            i += 1
        if i >= n:
            tokens.append((_EOS, ""))
            return tokens
        if text[i] in _SPECIAL:  # the longest symbol (all are one or two characters)
            two = text[i : i + 2]
            lit = two if two in _SYMBOLS else text[i]
            tokens.append((_SYMBOLS[lit], lit))
            i += len(lit)
            continue
        start = i
        while i < n and text[i] not in _SPECIAL and text[i] not in _BLANK:
            i += 1
        word = text[start:i]
        tokens.append((_KEYWORDS.get(word, _ID), word))


class _Parser:
    """`in` and `notin` are operators only right after a key; elsewhere they are plain words."""

    def __init__(self, text: str) -> None:
        self._tokens = _lex(text)
        self._pos = 0

    def _peek(self, as_values: bool = True) -> tuple[int, str]:
        tok, lit = self._tokens[self._pos]
        return (_ID if as_values and tok in (_IN, _NOTIN) else tok), lit

    def _next(self, as_values: bool = True) -> tuple[int, str]:
        item = self._peek(as_values)
        self._pos += 1
        return item

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        while True:
            tok, lit = self._peek()
            if tok == _EOS:
                return requirements
            if tok not in (_ID, _NOT):
                raise SelectorError(f"found '{lit}', expected: !, identifier, or 'end of string'")
            try:
                requirements.append(self._requirement())
            except SelectorError as exc:
                raise SelectorError(f"unable to parse requirement: {exc}") from None
            tok, lit = self._next()
            if tok == _EOS:
                return requirements
            if tok != _COMMA:
                raise SelectorError(f"found '{lit}', expected: ',' or 'end of string'")
            tok, lit = self._peek()
            if tok not in (_ID, _NOT):
                raise SelectorError(f"found '{lit}', expected: identifier after ','")

    def _requirement(self) -> Requirement:
        negated = False
        tok, key = self._next()
        if tok == _NOT:
            negated = True
            tok, key = self._next()
        if tok != _ID:
            raise SelectorError(f"found '{key}', expected: identifier")
        if errors := key_errors(key):
            raise SelectorError(f"invalid label key {_quote(key)}: {'; '.join(errors)}")
        if negated:
            return requirement(key, DOES_NOT_EXIST)
        if self._peek()[0] in (_EOS, _COMMA):
            return requirement(key, EXISTS)
        tok, lit = self._next(as_values=False)
        operator = _OPERATOR_OF.get(tok)
        if operator is None:
            raise SelectorError(f"found '{lit}', expected: {', '.join(_BINARY)}")
        values = self._set_values() if operator in (IN, NOT_IN) else [self._exact_value()]
        return requirement(key, operator, values)

    def _exact_value(self) -> str:
        tok, _ = self._peek()
        if tok in (_EOS, _COMMA):
            return ""  # `k=` means the empty value
        tok, lit = self._next()
        if tok != _ID:
            raise SelectorError(f"found '{lit}', expected: identifier")
        return lit

    def _set_values(self) -> list[str]:
        tok, lit = self._next()
        if tok != _OPEN:
            raise SelectorError(f"found '{lit}' expected: '('")
        tok, lit = self._peek()
        if tok == _CLOSE:  # `()` is the set of the empty value
            self._next()
            return [""]
        if tok not in (_ID, _COMMA):
            raise SelectorError(f"found '{lit}', expected: ',', ')' or identifier")
        values = self._identifiers()
        if self._next()[0] != _CLOSE:
            raise SelectorError(f"found '{lit}', expected: ')'")
        return values

    def _identifiers(self) -> list[str]:
        """Comma-separated words up to `)`; an omitted word is the empty value (`(a,,b)`, `(,a)`)."""
        values: list[str] = []
        while True:
            tok, lit = self._next()
            if tok == _ID:
                values.append(lit)
                tok2, lit2 = self._peek()
                if tok2 == _COMMA:
                    continue
                if tok2 == _CLOSE:
                    return values
                raise SelectorError(f"found '{lit2}', expected: ',' or ')'")
            if tok == _COMMA:
                if not values:
                    values.append("")
                tok2, _ = self._peek()
                if tok2 == _CLOSE:
                    values.append("")
                    return values
                if tok2 == _COMMA:
                    self._next()
                    values.append("")
                continue
            raise SelectorError(f"found '{lit}', expected: ',', or identifier")
