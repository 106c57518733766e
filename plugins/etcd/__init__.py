"""The ``etcd`` plugin: etcd v3 as the kvstore, for the local cluster and remote ones.

``--etcd-config FILE`` takes the same YAML as a clustermesh file (``endpoints``,
``trusted-ca-file`` or ``ca-file``, ``cert-file``, ``key-file``).
"""

from pathlib import Path

import meshagent
from meshagent.plugin import UsageError
from meshagent.plugins.etcd.client import EtcdKVStore
from meshagent.plugins.etcd.config import load_etcd_config


class EtcdBackend:
    name = "etcd"

    def local_client(self, config) -> EtcdKVStore:
        return EtcdKVStore(load_etcd_config(Path(config.get("etcd-config"))))

    def client_from_file(self, path: Path) -> EtcdKVStore:
        return EtcdKVStore(load_etcd_config(path))

    def files_of(self, path: Path) -> tuple[Path, ...]:
        try:
            config = load_etcd_config(path)
        except UsageError:
            return ()
        return tuple(f for f in (config.trusted_ca_file, config.cert_file, config.key_file)
                     if f is not None)


@meshagent.hookimpl
def meshagent_addoption(parser):
    group = parser.getgroup("etcd", "etcd kvstore plugin")
    group.addoption("etcd-config", type=str, default="",
                    help="etcd client config (YAML: endpoints, trusted-ca-file, cert-file,"
                         " key-file), as for a clustermesh file")


@meshagent.hookimpl
def meshagent_configure(config):
    if config.get("kvstore") in ("", "etcd"):
        path = config.get("etcd-config")
        if not path:
            raise UsageError("--etcd-config is required by the etcd kvstore (a YAML file with"
                             " 'endpoints:')")
        load_etcd_config(Path(path))  # fail now, with the file and field named


@meshagent.hookimpl
def meshagent_register_kvstore(registry):
    registry.register("etcd", lambda agent: EtcdBackend())
