"""The datapath slot: its contract (re-exported here) and the feed, the datapath's one door:
it folds endpoints, ipcache changes, the policy resolver's map changes and services into
batches of net changes."""

from meshagent.datapath.contract import Datapath, DatapathBatch, ReportsConnections

__all__ = ["Datapath", "DatapathBatch", "ReportsConnections"]
