"""The ``consul`` plugin: Consul as the kvstore, for the local cluster and remote ones.

``--consul-address`` for the local cluster; a clustermesh file with ``kvstore: consul`` and
``address: http://HOST:8500`` (optionally ``token``) for a remote cluster on Consul. See
``client.py`` for how the contract maps onto Consul (sessions as leases, blocking queries as
watches, no history).
"""

from pathlib import Path

import yaml

import meshagent
from meshagent.plugin import UsageError


class ConsulBackend:
    name = "consul"

    def local_client(self, config):
        from meshagent.plugins.consul.client import ConsulKVStore
        return ConsulKVStore(config.get("consul-address"), config.get("consul-token") or None)

    def client_from_file(self, path: Path):
        from meshagent.plugins.consul.client import ConsulKVStore
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"consul config {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise UsageError(f"consul config {path}: needs 'address: http://HOST:PORT'")
        return ConsulKVStore(data["address"], data.get("token"))

    def files_of(self, path: Path) -> tuple[Path, ...]:
        return ()  # the file holds all there is (address, token)


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("consul", "consul kvstore plugin")
    group.addoption("consul-address", type=str, default="http://127.0.0.1:8500",
                    help="HTTP address of the local cluster's Consul")
    group.addoption("consul-token", type=str, default="", help="ACL token, if any")


@meshagent.hookimpl
def meshagent_register_kvstore(registry):
    registry.register("consul", lambda agent: ConsulBackend())
