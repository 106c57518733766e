"""The ``nftables`` plugin: enforce policy with one nftables ``netdev`` table (libnftables).

For nodes where compiling BPF is not allowed or not possible: no kernel headers, no LLVM, no
bpffs. Same contract and same tests as the ``ebpf`` datapath; global services are not
load-balanced here (docs/nftables.md).
"""

import meshagent


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("nftables", "nftables datapath plugin")
    group.addoption("nftables-table", type=str, default="meshagent",
                    help="the netdev table this agent owns (nothing else is touched)")
    group.addoption("nftables-log-group", type=int, default=7,
                    help="NFLOG group the table logs flow events to (drops, policy verdicts,"
                         " traces)")
    group.addoption("nftables-event-rate", type=int, default=1000,
                    help="policy verdicts and traces logged a second per endpoint and"
                         " direction (more are counted as lost events)")
    group.addoption("nftables-drop-rate", type=int, default=50,
                    help="drops logged a second per endpoint, direction, reason and match type"
                         " (more are counted as lost events)")
    group.addoption("nftables-flow-timeout", type=int, default=21600,
                    help="seconds a flow's replies stay allowed after its last packet")


def build_datapath(agent):
    """The datapath with what it uses: its options, and where its flow events go."""
    from meshagent.plugins.nftables.datapath import (
        NftablesDatapath,
        NftablesMetrics,
        NftablesSettings,
    )
    datapath = NftablesDatapath(NftablesSettings.from_config(agent.config), agent.flow_events)
    agent.plugins.register(datapath, name="nftables.datapath")  # its status and API routes
    agent.metrics.register(NftablesMetrics(datapath))
    return datapath


@meshagent.hookimpl
def meshagent_register_datapath(registry):
    registry.register("nftables", build_datapath)


@meshagent.hookimpl
def meshagent_commands():
    from meshagent.plugins.nftables.commands import COMMANDS
    return list(COMMANDS)
