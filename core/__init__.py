"""meshagent: a node agent that does what a Cilium agent does with ClusterMesh enabled.

Plugins implement hooks with :data:`hookimpl`; the hook specifications live in
:mod:`meshagent.hookspecs`.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

PROJECT = "meshagent"

#: Marker for hook implementations: ``@meshagent.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)

try:
    __version__ = version(PROJECT)
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "__version__", "PROJECT"]
