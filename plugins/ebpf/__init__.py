"""The ``ebpf`` plugin: enforce policy in the kernel with tc programs (bcc + pyroute2).

One compiled pair of programs serves every endpoint; endpoint facts, the ipcache, policy,
conntrack and counters live in maps pinned under ``<bpf-root>/meshagent`` so that a restarted
agent finds them — and the attached programs — as it left them.
"""

import meshagent
from meshagent.plugin import parse_bool  # noqa: F401 (re-exported for option types)


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("ebpf", "eBPF datapath plugin")
    group.addoption("ebpf-bpf-root", type=str, default="/sys/fs/bpf",
                    help="bpffs mount; maps are pinned under <root>/meshagent (give each agent"
                         " sharing a machine its own)")
    group.addoption("ebpf-ipcache-max", type=int, default=512000, help="ipcache map entries")
    group.addoption("ebpf-policy-max", type=int, default=262144,
                    help="policy map entries (all endpoints together)")
    group.addoption("ebpf-ct-tcp-max", type=int, default=524288, help="TCP conntrack entries")
    group.addoption("ebpf-ct-any-max", type=int, default=262144,
                    help="non-TCP conntrack entries")
    group.addoption("ebpf-ct-timeout-tcp", type=float, default=21600.0,
                    help="seconds an idle TCP connection stays tracked")
    group.addoption("ebpf-ct-timeout-any", type=float, default=60.0,
                    help="seconds an idle non-TCP flow stays tracked")
    group.addoption("ebpf-program-cache", type=parse_bool, default=True,
                    help="keep compiled programs by a hash of their source, defines, kernel and"
                         " compiler, so a start with nothing changed need not compile them")
    group.addoption("ebpf-program-cache-dir", type=str, default="",
                    help="where compiled programs are kept (default: <state-dir>/bpf-programs)")
    group.addoption("ebpf-event-pages", type=int, default=64,
                    help="flow event perf buffer per CPU, in pages (a power of two); events"
                         " a full buffer cannot take are counted as lost")


def build_datapath(agent):
    """The datapath with what it uses: its options, and where its flow events go."""
    from meshagent.plugins.ebpf.datapath import DatapathMetrics, EbpfDatapath, EbpfSettings
    datapath = EbpfDatapath(EbpfSettings.from_config(agent.config), agent.flow_events)
    agent.plugins.register(datapath, name="ebpf.datapath")  # its status and API routes
    agent.metrics.register(DatapathMetrics(datapath))
    return datapath


@meshagent.hookimpl
def meshagent_register_datapath(registry):
    registry.register("ebpf", build_datapath)


@meshagent.hookimpl
def meshagent_commands():
    from meshagent.plugins.ebpf.commands import COMMANDS
    return list(COMMANDS)
