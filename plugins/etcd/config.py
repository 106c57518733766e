"""etcd client configuration: the YAML of ``--etcd-config`` and of clustermesh files.

The seed's clustermesh file::

    endpoints:
      - https://10.2.2.2:2379
    ca-file:   '/var/lib/cilium/clustermesh/cluster2-etcd-client-ca.crt'
    key-file:  '/var/lib/cilium/clustermesh/cluster2-etcd-client.key'
    cert-file: '/var/lib/cilium/clustermesh/cluster2-etcd-client.crt'

``trusted-ca-file`` is the current spelling of ``ca-file``; both are accepted.
"""

from pathlib import Path
from urllib.parse import urlsplit

import attrs
import yaml

from meshagent.plugin import UsageError


@attrs.frozen
class Endpoint:
    url: str
    host: str
    port: int
    tls: bool


@attrs.frozen
class EtcdConfig:
    endpoints: tuple[Endpoint, ...]
    trusted_ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    source: str = ""


def parse_endpoint(url: str, source: str) -> Endpoint:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source}: endpoint {url!r} is not http(s)://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise UsageError(f"{source}: endpoint {url!r} has an invalid port") from None
    return Endpoint(url, parts.hostname, port, parts.scheme == "https")


def load_etcd_config(path: Path) -> EtcdConfig:
    """Parse and check one config file; UsageError names the file and the field."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"etcd config {source}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"etcd config {source}: not valid YAML: {exc}") from None
    return etcd_config_from_dict(data, source)


def etcd_config_from_dict(data: object, source: str) -> EtcdConfig:
    if not isinstance(data, dict):
        raise UsageError(f"etcd config {source}: expected a mapping with 'endpoints'")
    endpoints = data.get("endpoints")
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if not endpoints or not isinstance(endpoints, list) or not all(
            isinstance(e, str) for e in endpoints):
        raise UsageError(f"etcd config {source}: 'endpoints' must be a non-empty list of URLs")
    parsed = tuple(parse_endpoint(e, f"etcd config {source}") for e in endpoints)

    def path_field(*names: str) -> Path | None:
        for name in names:
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise UsageError(f"etcd config {source}: {name!r} must be a file path")
            return Path(value)
        return None

    ca = path_field("trusted-ca-file", "ca-file")
    cert = path_field("cert-file")
    key = path_field("key-file")
    if (cert is None) != (key is None):
        raise UsageError(f"etcd config {source}: 'cert-file' and 'key-file' go together")
    if not any(e.tls for e in parsed) and (ca or cert):
        raise UsageError(f"etcd config {source}: TLS files given but no https:// endpoint")
    return EtcdConfig(parsed, ca, cert, key, source)
