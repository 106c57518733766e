"""Policy: CiliumNetworkPolicy in, per-endpoint verdicts out.

``contract`` is the slot's contract and the map state it hands the datapath; ``api``
validates documents into attrs classes, ``selector`` matches peers to identities,
``resolver`` computes each endpoint's map state incrementally, ``service`` is the default
provider (policies stored in the cluster's kvstore).
"""

from meshagent.policy.contract import (
    ChangeQueue,
    EndpointChanges,
    MapChange,
    MapKey,
    MapState,
    PolicyResolver,
    Verdict,
)

__all__ = ["ChangeQueue", "EndpointChanges", "MapChange", "MapKey", "MapState",
           "PolicyResolver", "Verdict"]
