"""Endpoint options as Cilium names, values and prints them (``cilium endpoint config``,
``cilium endpoint list``), and the endpoint's audit setting in its saved state. Unprivileged;
tests/test_endpoint_config.py drives the same through a real agent."""

import ipaddress
import json

import pytest
from conftest import run_cli

from meshagent.cli import POLICY_COLUMNS, _endpoint_row
from meshagent.endpoint.options import parse_options, policy_enabled
from meshagent.errors import UsageError
from meshagent.model.endpoint import Endpoint, endpoint_from_json, endpoint_to_json


# Cilium's option.NormalizeBool (pkg/option/option.go) accepts these, in any case; the
# option name is looked up without regard to case (OptionLibrary.Lookup)
@pytest.mark.parametrize("word", ["Enabled", "enabled", "ENABLE", "true", "on", "1"])
def test_every_spelling_cilium_takes_for_enabled(word):
    assert parse_options({"policyauditmode": word}) == {"PolicyAuditMode": True}


@pytest.mark.parametrize("word", ["Disabled", "disable", "False", "off", "0"])
def test_every_spelling_cilium_takes_for_disabled(word):
    assert parse_options({"PolicyAuditMode": word}) == {"PolicyAuditMode": False}


def test_default_clears_the_endpoints_own_setting():
    assert parse_options({"PolicyAuditMode": "Default"}) == {"PolicyAuditMode": None}


def test_an_unknown_name_or_value_is_named():
    with pytest.raises(UsageError, match="unknown endpoint option 'Debugg'; options:"
                                         " PolicyAuditMode"):
        parse_options({"PolicyAuditMode": "Enabled", "Debugg": "Enabled"})
    with pytest.raises(UsageError, match="invalid value 'maybe' for endpoint option"
                                         " PolicyAuditMode: expected Enabled, Disabled or"
                                         " Default"):
        parse_options({"PolicyAuditMode": "maybe"})


# (ingress enforced, egress enforced, audit) -> Cilium's EndpointPolicyEnabled value and the
# two POLICY ENFORCEMENT columns cilium endpoint list prints for it
# (pkg/endpoint/api.go policyStatus; cilium-dbg/cmd/endpoint_list.go endpointPolicyMode)
CASES = [
    (False, False, False, "none", ("Disabled", "Disabled")),
    (True, False, False, "ingress", ("Enabled", "Disabled")),
    (False, True, False, "egress", ("Disabled", "Enabled")),
    (True, True, False, "both", ("Enabled", "Enabled")),
    (False, False, True, "none", ("Disabled", "Disabled")),  # nothing enforced, nothing audited
    (True, False, True, "audit-ingress", ("Disabled (Audit)", "Disabled")),
    (False, True, True, "audit-egress", ("Disabled", "Disabled (Audit)")),
    (True, True, True, "audit-both", ("Disabled (Audit)", "Disabled (Audit)")),
]


@pytest.mark.parametrize("ingress,egress,audit,enabled,columns", CASES)
def test_policy_enabled_and_its_columns_as_cilium(ingress, egress, audit, enabled, columns):
    assert policy_enabled(ingress, egress, audit) == enabled
    assert POLICY_COLUMNS[enabled] == columns


def test_a_resolver_that_does_not_say_leaves_the_columns_unknown():
    """policy_enabled is null when the resolver lacks ReportsEnforcement: Cilium's
    UnknownState."""
    row = _endpoint_row({"id": 1, "labels": [], "ipv4": "10.1.1.1", "identity": 70000,
                         "ifname": "lxc1", "namespace": "default", "policy_enabled": None})
    assert row[1:3] == ("Unknown", "Unknown")


def endpoint(**fields) -> Endpoint:
    return Endpoint(3, "default", frozenset({"k8s:app=x"}), ipaddress.IPv4Address("10.1.1.3"),
                    70000, **fields)


def test_the_own_setting_and_the_effective_mode_are_saved_with_the_endpoint():
    for fields in ({}, {"policy_audit": True, "policy_audit_mode": True},
                   {"policy_audit": False, "policy_audit_mode": False},
                   {"policy_audit": True, "policy_audit_mode": None}):
        saved = endpoint(**fields)
        assert endpoint_from_json(endpoint_to_json(saved)) == saved


def test_a_file_saved_before_audit_mode_existed_follows_the_agent():
    doc = json.loads(endpoint_to_json(endpoint()))
    del doc["policy_audit"], doc["policy_audit_mode"]
    restored = endpoint_from_json(json.dumps(doc))
    assert (restored.policy_audit, restored.policy_audit_mode) == (False, None)


def test_list_options_as_cilium():
    """``cilium endpoint config --list-options`` prints ``%-24s %s``: name, description."""
    result = run_cli("endpoint", "config", "--list-options")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "PolicyAuditMode          Enable audit mode for policies\n"
    missing = run_cli("endpoint", "config")
    assert missing.returncode == 2 and "give an endpoint ID" in missing.stderr
