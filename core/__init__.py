"""meshagent: a node agent that does what a Cilium agent does with ClusterMesh enabled.

Plugins implement hooks with :data:`hookimpl`; the hook specifications live in
:mod:`meshagent.hooks.specs`.
"""

import pluggy

PROJECT = "meshagent"

#: Marker for hook implementations: ``@meshagent.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)



def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use: importlib.metadata
    costs every CLI call ~20 ms otherwise."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PROJECT)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"

__all__ = ["hookimpl", "__version__", "PROJECT"]
