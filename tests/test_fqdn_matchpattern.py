"""``matchName`` / ``matchPattern`` as Cilium reads them: the cases of Cilium's
``pkg/fqdn/matchpattern/matchpattern_test.go`` (TestMatchPatternREConversion,
TestMatchPatternMatching, TestMatchPatternSanitize) and ``pkg/fqdn/dns`` (``dns.FQDN``)."""

import re

import pytest

from meshagent.fqdn import matchpattern
from meshagent.fqdn.contract import FQDNSelector


@pytest.mark.parametrize("pattern, regex", [
    ("*.cilium.io.", "^[-a-zA-Z0-9_]*[.]cilium[.]io[.]$"),
    ("cilium.io.", "^cilium[.]io[.]$"),
    ("*", "(^([-a-zA-Z0-9_]+[.])+$)|(^[.]$)"),
])
def test_patterns_become_cilium_regexes(pattern, regex):
    assert matchpattern.to_regex(pattern) == regex


@pytest.mark.parametrize("pattern, accepted, rejected", [
    ("cilium.io.", ["cilium.io."], ["ciliumandmore.io.", "x.cilium.io.", "cilium.io"]),
    ("*.cilium.io.", ["anysub.cilium.io."],
     ["cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."]),
    ("*.ci*.io.", ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."],
     ["cilium.io."]),
    ("*", [".", "io.", "cilium.io.", "svc.cluster.local.", "_foobar._tcp.cilium.io."],
     ["", ".io.", ".cilium.io.", "cilium.io"]),
    ("*.*.cilium.io.", ["_foobar._tcp.cilium.io."], ["cilium.io.", "a.cilium.io."]),
    ("**.cilium.io.", ["a.cilium.io.", "a.b.cilium.io."], ["cilium.io."]),
])
def test_patterns_match_as_cilium_matches(pattern, accepted, rejected):
    selector = FQDNSelector(match_pattern=pattern)
    regex = re.compile(matchpattern.to_regex(matchpattern.sanitize(pattern)))
    assert [n for n in accepted if not regex.match(n)] == []
    assert [n for n in rejected if regex.match(n)] == []
    # the selector lowercases and qualifies the name it is asked about
    assert all(selector.matches(n.upper().rstrip(".") or ".") for n in accepted if n != ".")


@pytest.mark.parametrize("pattern, sanitized", [
    ("*", "*"), ("*.", "*."), ("*.com", "*.com."), ("Cilium.IO", "cilium.io."),
])
def test_sanitize(pattern, sanitized):
    assert matchpattern.sanitize(pattern) == sanitized


def test_fqdn_keeps_an_escaped_final_dot_as_part_of_the_name():
    assert matchpattern.fqdn("a.b.") == "a.b."
    assert matchpattern.fqdn("a.b\\.") == "a.b\\.."
    assert matchpattern.fqdn("a.b\\\\.") == "a.b\\\\."


def test_match_name_is_literal():
    selector = FQDNSelector(match_name="api.example.com")
    assert selector.matches("API.example.com") and selector.matches("api.example.com.")
    assert not selector.matches("apixexample.com") and not selector.matches("x.api.example.com")
    assert selector.label == "fqdn:api.example.com"


@pytest.mark.parametrize("pattern, error", [
    ("a" * 256, 'Must be <= 255 characters long.'),
    ("bad/char.io", 'Invalid characters in MatchPattern: "bad/char.io". Only 0-9, a-z, A-Z'
                    ' and ., -, _ and * characters are allowed'),
])
def test_validate_refuses_with_cilium_texts(pattern, error):
    with pytest.raises(ValueError, match=error.replace(".", r"\.").replace("*", r"\*")):
        matchpattern.validate(pattern)
