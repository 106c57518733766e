"""``meshagent kvstoremesh [options]`` runs the process; ``meshagent kvstoremesh status`` and
``meshagent kvstoremesh remotes`` ask a running one over its socket."""

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshagent.client import AgentClient
from meshagent.errors import UsageError
from meshagent.runtime.config import DEFAULT_RUN_DIR
from meshagent.runtime.options import Parser

if TYPE_CHECKING:
    from meshagent.kvstoremesh.process import KVStoreMesh

DEFAULT_SOCKET = DEFAULT_RUN_DIR / "kvstoremesh.sock"
HELP = """\
Run KVStoreMesh: meshagent kvstoremesh --plugins etcd --cluster-name C --cluster-id N
--etcd-config FILE --clustermesh-config DIR. It copies every remote cluster of the directory
into this cluster's kvstore (cilium/cache/...); agents then read remote clusters from there.
'meshagent kvstoremesh status' shows a running one.

"""


def add_options(parser: Parser) -> None:
    group = parser.getgroup("kvstoremesh", "kvstoremesh options")
    group.addoption("kvstoremesh-socket-path", type=Path, default=DEFAULT_SOCKET,
                    help="unix socket of the kvstoremesh API")
    group.addoption("kvstoremesh-leader-ttl", type=float, default=6.0,
                    help="seconds a dead leader's lease lasts before a standby replica takes"
                         " over (its cache stays meanwhile)")


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    if argv and argv[0] in ("status", "remotes"):
        return _client(argv, environ)
    return _run(argv, environ)


def _run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    import asyncio

    from meshagent.kvstoremesh.process import serve
    from meshagent.runtime.logsetup import configure_logging
    mesh = build(argv, environ)
    configure_logging(mesh.config.get("log-format"), mesh.config.get("debug"))
    asyncio.run(serve(mesh))
    return 0


def build(argv: Sequence[str], environ: Mapping[str, str]) -> "KVStoreMesh":
    """Everything up to the first side effect: plugins, options, the kvstore backends."""
    from meshagent.hooks.startup import load_config
    from meshagent.hooks.slots import KVSTORE, BuiltProviders
    from meshagent.kvstoremesh.process import KVStoreMesh
    config, plugins = load_config(argv, environ, HELP, extra_options=add_options)
    if not config.get("clustermesh-config"):
        raise UsageError("meshagent kvstoremesh needs --clustermesh-config: the directory of"
                         " remote clusters to cache")
    # every plugin is registered (backend factories get no agent to register more through)
    plugins.check_pending()
    registry = plugins.hooks.register_providers(KVSTORE)
    local = registry.select(config.get("kvstore"), lambda: plugins.offers(KVSTORE))
    # kvstore backends need no agent: the process that is not one gives their factories None
    backends = BuiltProviders(registry, local.name, None)
    return KVStoreMesh(config, backends.named, config.get("kvstoremesh-socket-path"),
                       config.get("kvstoremesh-leader-ttl"))


def _client(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    from meshagent.runtime.clioutput import print_json, print_status, status_args
    parser = argparse.ArgumentParser(prog=f"meshagent kvstoremesh {argv[0]}")
    parser.add_argument("--socket-path", type=Path, default=Path(environ.get(
        "MESHAGENT_KVSTOREMESH_SOCKET_PATH", DEFAULT_SOCKET)),
        help="kvstoremesh API socket [env MESHAGENT_KVSTOREMESH_SOCKET_PATH]")
    status_args(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        return int(exc.code or 0)
    client = AgentClient(args.socket_path)
    if argv[0] == "remotes":
        print_json(client.get("/clustermesh"))
        return 0
    return print_status(client, args.output, verbose=args.verbose)
