"""Endpoint options (``meshagent endpoint config``), named, valued and printed as Cilium's.

Cilium's mutable endpoint options (``pkg/option/runtime_options.go``; ``option.go`` parses
them) are looked up without regard to case, take a boolean in any spelling
``option.NormalizeBool`` accepts and print as ``Enabled``/``Disabled``. Of them meshagent has ``PolicyAuditMode``. Unlike Cilium, which
resets it to the daemon's ``--policy-audit-mode`` on restart, meshagent keeps an endpoint's own
setting with the endpoint; ``Default`` clears it, so the endpoint follows the agent's option
again.
"""

from collections.abc import Mapping

from meshagent.errors import UsageError

POLICY_AUDIT_MODE = "PolicyAuditMode"
#: name -> description (Cilium's wording), for ``meshagent endpoint config --list-options``
OPTIONS = {POLICY_AUDIT_MODE: "Enable audit mode for policies"}

ENABLED, DISABLED, DEFAULT = "Enabled", "Disabled", "Default"
_TRUE = frozenset({"true", "on", "enable", "enabled", "1"})  # option.NormalizeBool's
_FALSE = frozenset({"false", "off", "disable", "disabled", "0"})


def parse_options(options: Mapping[str, str]) -> dict[str, bool | None]:
    """``{name: value}`` as typed into ``{canonical name: True, False or None (Default)}``.

    Every option is checked before the caller applies any: UsageError names the first
    unknown name or value.
    """
    parsed = {}
    for name, value in options.items():
        canonical = next((known for known in OPTIONS if known.lower() == str(name).lower()),
                         None)
        if canonical is None:
            raise UsageError(f"unknown endpoint option {name!r}; options:"
                             f" {', '.join(OPTIONS)}")
        word = str(value).lower()
        if word in _TRUE:
            parsed[canonical] = True
        elif word in _FALSE:
            parsed[canonical] = False
        elif word == DEFAULT.lower():
            parsed[canonical] = None
        else:
            raise UsageError(f"invalid value {value!r} for endpoint option {canonical}:"
                             f" expected {ENABLED}, {DISABLED} or {DEFAULT} (the agent's"
                             " --policy-audit-mode)")
    return parsed


def format_setting(on: bool) -> str:
    return ENABLED if on else DISABLED


def policy_enabled(ingress: bool, egress: bool, audit: bool) -> str:
    """The endpoint's policy state in the words of Cilium's endpoint model
    (``EndpointPolicyEnabled``): which directions policy is enforced in, ``audit-`` prefixed
    when the endpoint is in audit mode (and so enforces none of them)."""
    enabled = {(False, False): "none", (True, False): "ingress", (False, True): "egress",
               (True, True): "both"}[(ingress, egress)]
    return f"audit-{enabled}" if audit and enabled != "none" else enabled
