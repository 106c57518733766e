"""The nftables datapath's settings come from the agent's options, and the table it builds
says what it logs (no root needed: the ruleset's text)."""

import re

from meshagent.plugins import nftables
from meshagent.plugins.nftables.datapath import NftablesSettings
from meshagent.plugins.nftables.ruleset import Ruleset
from meshagent.runtime.config import Config, add_core_options
from meshagent.runtime.options import Parser


def settings(*args: str) -> NftablesSettings:
    parser = Parser()
    add_core_options(parser)
    nftables.meshagent_addoption(parser)
    return NftablesSettings.from_config(Config.from_parsed(parser.parse(list(args), {})))


def prefixes(rules: Ruleset, audit: bool = False) -> set[str]:
    """The events an endpoint's chains log (``<event>:<reason>``)."""
    text = rules.endpoint(1, "h101", "10.1.1.1", "fd00::1", audit).text()
    return {":".join(p.split(":")[3:5]) for p in re.findall(r'log prefix "([^"]+)"', text)}


def test_hubble_on_logs_verdicts_and_traces_and_off_logs_drops_only():
    on, off = settings(), settings("--enable-hubble=false", "--nftables-event-rate=7",
                                   "--nftables-drop-rate=3")
    assert (on.flows, on.event_rate, on.drop_rate) == (True, 1000, 50)
    assert (off.flows, off.event_rate, off.drop_rate) == (False, 7, 3)
    logged_on = prefixes(Ruleset(flows=on.flows))
    assert {"verdict:forwarded", "trace:forwarded", "reply:forwarded",
            "drop:policy_deny", "drop:spoofed"} <= logged_on
    assert {p.split(":")[0] for p in prefixes(Ruleset(flows=False))} == {"drop"}
    assert Ruleset(flows=True).layout != Ruleset(flows=False).layout  # another table


def test_audit_mode_turns_policy_drops_into_audits_and_nothing_else():
    enforcing, auditing = prefixes(Ruleset()), prefixes(Ruleset(), audit=True)
    policy = {"drop:policy_deny", "drop:policy_default"}
    assert policy <= enforcing and not policy & auditing
    assert {"audit:policy_deny", "audit:policy_default"} <= auditing
    assert enforcing - policy == auditing - {"audit:policy_deny", "audit:policy_default"}
