"""The datapath slot: its contract (re-exported here) and the feed that drives any datapath
from the policy resolver's contract, the ipcache and the services."""

from meshagent.datapath.contract import Datapath

__all__ = ["Datapath"]
