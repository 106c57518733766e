"""The host routing that takes a packet marked for the DNS proxy to the proxy's socket.

A datapath hands a packet for the agent's DNS proxy to the node's stack with its destination
kept (an address of anywhere) and the mark ``MARK_MAGIC_TO_PROXY`` under ``MARK_MAGIC_MASK``
(Cilium's ``linux_defaults``: 0x200/0xf00). Without more the node would forward it; Cilium's
to-proxy rule sends it through a table whose only route delivers every address locally
(``ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9``; ``ip route add local 0.0.0.0/0 dev
lo table 2004``, and the same for IPv6), where the socket the datapath chose (``bpf_sk_assign``,
or nftables' ``tproxy``) takes it. The same two rules and two routes, here, for any datapath.
"""

import logging
import socket

log = logging.getLogger(__name__)

MARK_MAGIC_TO_PROXY = 0x0200  # Cilium's linux_defaults.MagicMarkIsToProxy
MARK_MAGIC_MASK = 0x0F00  # linux_defaults.MagicMarkHostMask
TABLE_TO_PROXY = 2004  # linux_defaults.RouteTableToProxy
PRIORITY_TO_PROXY = 9  # linux_defaults.RulePriorityToProxyIngress
FAMILIES = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
RTN_LOCAL, SCOPE_HOST = 2, 254


class ProxyRoutes:
    """The to-proxy rule and table in the agent's network namespace, both families.

    Blocking (netlink): call in a thread. :meth:`install` is idempotent and :meth:`remove`
    takes away exactly what it finds of them: a rule left behind would send the next run's
    marked packets to a table that may no longer exist."""

    def install(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family, anywhere in FAMILIES:
                try:
                    ipr.route("replace", family=family, dst=f"{anywhere}/0", type=RTN_LOCAL,
                              scope=SCOPE_HOST,
                              oif=lo, table=TABLE_TO_PROXY)
                except NetlinkError as exc:
                    if family == socket.AF_INET6:  # IPv6 is off here: no IPv6 to redirect
                        log.info("no IPv6 to-proxy route (%s)", exc)
                        continue
                    raise
                if not self._rules(ipr, family):
                    ipr.rule("add", family=family, priority=PRIORITY_TO_PROXY,
                             fwmark=MARK_MAGIC_TO_PROXY, fwmask=MARK_MAGIC_MASK,
                             table=TABLE_TO_PROXY)

    def remove(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            for family, anywhere in FAMILIES:
                for rule in self._rules(ipr, family):
                    ipr.rule("del", family=family, priority=PRIORITY_TO_PROXY,
                             fwmark=MARK_MAGIC_TO_PROXY, fwmask=MARK_MAGIC_MASK,
                             table=TABLE_TO_PROXY)
                try:
                    ipr.route("del", family=family, dst=f"{anywhere}/0", type=RTN_LOCAL,
                              scope=SCOPE_HOST,
                              table=TABLE_TO_PROXY)
                except NetlinkError as exc:
                    if exc.code not in (3, 2, 97):  # ESRCH, ENOENT, EAFNOSUPPORT: not there
                        raise

    def installed(self) -> bool:
        """Whether the IPv4 rule is there (what tests check after a stop)."""
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            return bool(self._rules(ipr, socket.AF_INET))

    @staticmethod
    def _rules(ipr, family: int) -> list:
        try:
            rules = ipr.get_rules(family=family)
        except Exception:  # the family is off in this namespace
            return []
        return [r for r in rules
                if r.get_attr("FRA_PRIORITY") == PRIORITY_TO_PROXY
                and r.get_attr("FRA_FWMARK") == MARK_MAGIC_TO_PROXY
                and (r.get_attr("FRA_TABLE") or r["table"]) == TABLE_TO_PROXY]


class NoProxyRoutes:
    """Routes nothing: for a datapath whose programs only run on synthetic packets."""

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass
