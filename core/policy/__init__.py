"""Policy: CiliumNetworkPolicy in, per-endpoint verdicts out.

``contract`` holds the repository's and the resolver slot's contracts and the map state
handed to the datapath; ``api`` validates documents into attrs classes, ``selector`` matches
peers to identities, ``resolver`` computes each endpoint's map state incrementally,
``repository`` is the core's repository (rules from the kvstore and every source, with
revisions), ``default`` the default resolver.
"""

from meshagent.policy.contract import (
    AttributesVerdicts,
    ChangeQueue,
    EndpointChanges,
    MapChange,
    MapKey,
    MapState,
    PolicyKey,
    PolicyRepository,
    PolicyResolver,
    PolicyUpdate,
    ReportsEnforcement,
    Verdict,
)

__all__ = ["AttributesVerdicts", "ChangeQueue", "EndpointChanges", "MapChange", "MapKey",
           "MapState", "PolicyKey", "PolicyRepository", "PolicyResolver", "PolicyUpdate",
           "ReportsEnforcement", "Verdict"]
