"""``meshagent lab up --outside NAME[:TTL]``: what the command line accepts, and the dnsmasq
command the lab runs for it (no root needed)."""

import pytest

from meshagent.errors import UsageError
from meshagent_dev.lab import DNS_TTL, Lab, OutsideHost, _check_outside


def test_a_name_takes_the_default_ttl_or_its_own():
    assert OutsideHost.parse("Allowed.Example.COM.") == OutsideHost("allowed.example.com")
    assert OutsideHost.parse("short.example.com:2") == OutsideHost("short.example.com", 2)
    assert OutsideHost.parse("a.example.com", ttl=7).ttl == 7 != DNS_TTL


@pytest.mark.parametrize("hosts, error", [
    (["a.example.com:soon"], "TTL 'soon' is not a number of seconds"),
    (["cilium.io"], "--outside cilium.io: the lab's DNS server holds names under example.com"),
    (["a.example.com", "A.example.com"], "a name given twice"),
])
def test_bad_outside_hosts_are_refused(hosts, error):
    with pytest.raises(UsageError, match=error):
        _check_outside([OutsideHost.parse(h) for h in hosts])


def test_dnsmasq_reads_nothing_of_the_machine_and_holds_each_name(tmp_path):
    lab = Lab(tmp_path)
    lab.state = {"dns": {"ip": "192.0.2.53", "hosts": {
        "allowed.example.com": {"ip": "192.0.2.10", "ttl": 60},
        "short.example.com": {"ip": "192.0.2.11", "ttl": 2}}}}
    command = lab.dnsmasq_command()
    for flag in ("--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--keep-in-foreground",
                 "--port=53", "--listen-address=192.0.2.53", "--log-queries"):
        assert flag in command
    assert "--host-record=allowed.example.com,192.0.2.10,60" in command
    assert "--host-record=short.example.com,192.0.2.11,2" in command
