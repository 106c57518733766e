"""From a command line to a configured plugin manager: what the agent and ``meshagent
kvstoremesh`` both start from (below both process roots)."""

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshagent.runtime.config import Config
    from meshagent.runtime.options import Parser


def load_config(argv: Sequence[str], environ: Mapping[str, str], description: str,
                extra_options: Callable[["Parser"], None] | None = None,
                extra_plugins: Sequence[tuple[str, object]] = ()) -> tuple["Config", Any]:
    """The plugins ``--plugins`` names, and every option (core, ``extra_options``, the
    plugins'), parsed and validated: what the agent and ``meshagent kvstoremesh`` start from."""
    from meshagent.hooks.manager import PluginManager, discover
    from meshagent.runtime.config import Config, add_bootstrap_options, add_core_options
    from meshagent.runtime.options import Parser
    bootstrap = Parser()
    add_bootstrap_options(bootstrap)
    selected = bootstrap.parse(argv, environ, partial=True).values["plugins"]
    available = discover()
    if "-h" in argv or "--help" in argv:  # help should work even with a wrong --plugins
        selected = [name for name in selected if name in available]
    plugins = PluginManager(selected, available)  # unknown names raise before any import
    for name, plugin in extra_plugins:
        plugins.register(plugin, name=name)
    parser = Parser(description=description)
    add_core_options(parser)
    if extra_options is not None:
        extra_options(parser)
    plugins.hooks.addoption(parser)
    config = Config.from_parsed(parser.parse(argv, environ))
    plugins.hooks.configure(config, plugins)
    return config, plugins
