"""Cilium's ``matchName`` / ``matchPattern`` → anchored regular expression
(``pkg/fqdn/matchpattern/matchpattern.go``), and its name canonicalisation
(``pkg/fqdn/dns/dns.go``): lower case, with the final dot.

``*`` is zero or more DNS characters within one label; a leading ``**.`` is one or more whole
labels; ``*`` alone matches every name, and the root.
"""

import re

MAX_LENGTH = 255  # MaxFQDNLength
_LABEL_CHAR = "[-a-zA-Z0-9_]"
_ALLOWED = re.compile(r"^[-a-zA-Z0-9_.*]+$")
_ALL_NAMES = f"(^({_LABEL_CHAR}+[.])+$)|(^[.]$)"
_SUBDOMAINS = f"({_LABEL_CHAR}+([.]{_LABEL_CHAR}+){{0,}})[.]"


def fqdn(name: str) -> str:
    """``name`` lowercased and fully qualified (Cilium's ``dns.FQDN``): a final dot escaped by
    an odd number of backslashes does not count."""
    name = name.lower()
    if name.endswith("."):
        backslashes = len(name[:-1]) - len(name[:-1].rstrip("\\"))
        if backslashes % 2 == 0:
            return name
    return name + "."


def _is_wildcard(pattern: str) -> bool:
    """Only stars, and at most one final dot: ``*``, ``**``, ``*.``."""
    return bool(pattern) and pattern.rstrip(".").strip("*") == "" and \
        pattern.count(".") <= 1 and pattern.startswith("*")


def sanitize(pattern: str) -> str:
    """A pattern as Cilium stores it: a bare wildcard unchanged, else :func:`fqdn`."""
    return pattern if _is_wildcard(pattern) else fqdn(pattern)


def validate(pattern: str) -> None:
    """Raise ValueError with Cilium's text for a pattern it refuses."""
    pattern = pattern.strip()
    if len(pattern) > MAX_LENGTH:
        raise ValueError(f'Invalid MatchPattern: "{pattern}". Must be <= {MAX_LENGTH}'
                         " characters long.")
    if not _ALLOWED.match(pattern):
        raise ValueError(f'Invalid characters in MatchPattern: "{pattern}". Only 0-9, a-z,'
                         " A-Z and ., -, _ and * characters are allowed")


def to_regex(pattern: str) -> str:
    """The anchored regex Cilium builds for a (sanitized) pattern."""
    pattern = pattern.strip().lower()
    if _is_wildcard(pattern):
        return _ALL_NAMES
    out = ["^"]
    prefix = re.match(r"^\*{2,}\.", pattern)
    if prefix:
        out.append(_SUBDOMAINS)
        pattern = pattern[prefix.end():]
    for run in re.finditer(r"\*+|.", pattern):
        text = run.group()
        out.append(f"{_LABEL_CHAR}*" if text.startswith("*") else
                   "[.]" if text == "." else re.escape(text))
    out.append("$")
    return "".join(out)


def name_regex(name: str) -> str:
    """The regex of a ``matchName``: the name itself, fully qualified."""
    return "^" + re.escape(fqdn(name)).replace(r"\.", "[.]") + "$"
