"""A service: frontends balanced over backends, possibly across clusters."""

import ipaddress

import attrs


@attrs.frozen
class Frontend:
    ip: ipaddress.IPv4Address
    port: int
    protocol: str = "TCP"


@attrs.frozen
class Backend:
    ip: ipaddress.IPv4Address
    port: int
    cluster: str
    protocol: str = "TCP"


@attrs.frozen
class Service:
    namespace: str
    name: str
    cluster: str
    frontends: tuple[Frontend, ...] = ()
    backends: tuple[Backend, ...] = ()
    global_: bool = False
    shared: bool = True
    affinity: str = "none"
