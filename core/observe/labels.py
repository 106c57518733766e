"""Hubble's label selectors (``--from-label``, ``FlowFilter.source_label``): Kubernetes
selector syntax over Cilium's source-prefixed labels.

Hubble (``pkg/hubble/filters/labels.go``) rewrites ``source:key`` to ``source.key``, parses the
result as a Kubernetes selector and evaluates it against the flow's labels as a Cilium
``LabelArray``, which reads a selector key's source up to its first dot. So ``k8s:app=db``
needs source ``k8s``; ``app=db`` (or ``any:app=db``) takes any source; and a dotted key without
a source, ``io.kubernetes.pod.namespace=x``, reads as source ``io`` and matches nothing — write
``k8s:io.kubernetes.pod.namespace=x``. This module does the same.
"""

import re
from collections.abc import Sequence

import attrs

from meshagent.model.identity import LABEL_KEY, LABEL_VALUE

ANY = "any"
_SOURCE = re.compile(r"[a-z0-9-]+")
_SPECIAL = "=!(),<>"


@attrs.frozen
class Requirement:
    source: str  # ANY: whatever the label's source
    key: str
    operator: str  # exists, !exists, in, notin, gt, lt
    values: frozenset[str] = frozenset()

    def matches(self, labels: Sequence[tuple[str, str, str]]) -> bool:
        found = next((v for s, k, v in labels
                      if k == self.key and self.source in (ANY, s)), None)
        if self.operator == "exists":
            return found is not None
        if self.operator == "!exists":
            return found is None
        if self.operator == "in":
            return found is not None and found in self.values
        if self.operator == "notin":
            return found is None or found not in self.values
        if found is None or not re.fullmatch(r"-?\d+", found):
            return False
        bound = int(next(iter(self.values)))
        return int(found) > bound if self.operator == "gt" else int(found) < bound


@attrs.frozen
class Selector:
    """Every requirement must hold (the empty selector selects everything)."""

    requirements: tuple[Requirement, ...]

    def matches(self, labels: Sequence[str]) -> bool:
        parsed = [parse_label(label) for label in labels]
        return all(r.matches(parsed) for r in self.requirements)


def parse_label(text: str) -> tuple[str, str, str]:
    """A flow's label, ``source:key=value``, as Cilium's ParseLabel reads it (no source:
    ``unspec``; no ``=``: an empty value)."""
    source, sep, rest = text.partition(":")
    if not sep:
        source, rest = "unspec", text
    key, _, value = rest.partition("=")
    return source, key, value


def parse_selector(text: str) -> Selector:
    """ValueError says what is wrong with ``text``."""
    tokens = _tokens(text)
    requirements = []
    at = 0
    while at < len(tokens):
        requirement, at = _requirement(tokens, at, text)
        requirements.append(requirement)
        if at < len(tokens):
            if tokens[at] != ",":
                raise ValueError(f"label selector {text!r}: expected ',' before {tokens[at]!r}")
            at += 1
            if at == len(tokens):
                raise ValueError(f"label selector {text!r}: ends with ','")
    return Selector(tuple(requirements))


def _tokens(text: str) -> list[str]:
    out = []
    at = 0
    while at < len(text):
        char = text[at]
        if char.isspace():
            at += 1
        elif text.startswith(("==", "!="), at):
            out.append(text[at:at + 2])
            at += 2
        elif char in _SPECIAL:
            out.append(char)
            at += 1
        else:
            end = at
            while end < len(text) and not text[end].isspace() and text[end] not in _SPECIAL:
                end += 1
            out.append(text[at:end])
            at = end
    return out


def _requirement(tokens: list[str], at: int, text: str) -> tuple[Requirement, int]:
    negated = tokens[at] == "!"
    if negated:
        at += 1
    if at >= len(tokens) or tokens[at] in _SPECIAL or tokens[at] in ("==", "!="):
        raise ValueError(f"label selector {text!r}: expected a label key")
    source, key = _key(tokens[at], text)
    at += 1
    nxt = tokens[at] if at < len(tokens) else ","
    if negated or nxt == ",":
        return Requirement(source, key, "!exists" if negated else "exists"), at
    if nxt in ("=", "==", "!="):
        at += 1
        value = ""
        if at < len(tokens) and tokens[at] not in _SPECIAL:
            value = _value(tokens[at], text)
            at += 1
        return Requirement(source, key, "notin" if nxt == "!=" else "in",
                           frozenset({value})), at
    if nxt in ("in", "notin"):
        values, at = _values(tokens, at + 1, text)
        return Requirement(source, key, nxt, values), at
    if nxt in (">", "<"):
        if at + 1 >= len(tokens) or not re.fullmatch(r"-?\d+", tokens[at + 1]):
            raise ValueError(f"label selector {text!r}: '{nxt}' needs an integer")
        return Requirement(source, key, "gt" if nxt == ">" else "lt",
                           frozenset({tokens[at + 1]})), at + 2
    raise ValueError(f"label selector {text!r}: unexpected {nxt!r} after {key!r}")


def _key(word: str, text: str) -> tuple[str, str]:
    """``source:key`` as Hubble reads it: the source up to the first colon, else up to the
    first dot (a Kubernetes key has no colon), else any."""
    if ":" in word:
        source, _, rest = word.partition(":")
        if not _SOURCE.fullmatch(source) or ":" in rest:
            raise ValueError(f"label selector {text!r}: bad key {word!r}")
        word = f"{source}.{rest}"
    if not LABEL_KEY.match(word):
        raise ValueError(f"label selector {text!r}: {word!r} is not a label key")
    source, dot, key = word.partition(".")
    return (source, key) if dot else (ANY, word)


def _value(word: str, text: str) -> str:
    if not LABEL_VALUE.match(word) or len(word) > 63:
        raise ValueError(f"label selector {text!r}: {word!r} is not a label value")
    return word


def _values(tokens: list[str], at: int, text: str) -> tuple[frozenset[str], int]:
    if at >= len(tokens) or tokens[at] != "(":
        raise ValueError(f"label selector {text!r}: expected '(' with a set of values")
    at += 1
    values = set()
    while at < len(tokens) and tokens[at] != ")":
        if tokens[at] != ",":
            values.add(_value(tokens[at], text))
        at += 1
    if at >= len(tokens):
        raise ValueError(f"label selector {text!r}: missing ')'")
    return frozenset(values), at + 1
