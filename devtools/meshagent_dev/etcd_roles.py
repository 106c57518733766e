"""Who may do what in one cluster's etcd: its users, their roles and key ranges, in one place.

Follows Cilium's clustermesh-apiserver, whose etcd gives remote clusters a read-only user
``remote`` (``rangesForRemoteRole`` in cilium/cilium ``pkg/kvstore/etcdinit/init.go``) and the
local agents reading KVStoreMesh's cache a read-only user ``local`` (``rangesForLocalRole``).
Every user has the role of its own name and is known by the CN of its client certificate
(etcd ``--client-cert-auth``; users made with ``--no-password``, as Cilium makes them).

- ``remote``: what another cluster reads here, read only: ``cilium/.heartbeat``,
  ``cilium/state/``, ``cilium/cluster-config/<us>``, ``cilium/synced/<us>/``. Not
  ``cilium/cache/``: a remote would read a third cluster through us. Cilium grants the
  heartbeat as a prefix (``cilium/.heartbeat*``); here it is the one key.
- ``agent``: our own agents: they write our state, our cluster's config, sync canaries and
  heartbeat, and meshagent's own keys (policies, local services, the identity GC gate), and
  read all of ``cilium/`` (another cluster's config, canaries and cache, with
  ``--clustermesh-read-cache``). Not KVStoreMesh's leader key.
- ``kvstoremesh``: ``meshagent kvstoremesh``: writes the cache, remote clusters' configs and
  sync canaries (any cluster's: it cannot know the names in advance), and its leader key
  (under ``meshagent/kvstoremesh/``: the election lists and watches it as a prefix).
- ``local``: Cilium's read-only user for an agent reading the cache through a clustermesh
  file (the lab's agents with ``--kvstoremesh``).
- ``root``: etcd needs it (with its built-in role ``root``) before auth can be enabled; for
  administrators only.

etcd 3.4 checks leases too: revoking one needs write permission on every key attached to it,
and a put may not attach a lease whose keys the user cannot write; granting and keeping a
lease alive are not checked. Each of our users only puts its own keys on its own leases.
``tests/test_etcd_roles.py`` checks every grant against a real etcd.
"""

import attrs

from meshagent.clustermesh.cache import CACHE, STATE
from meshagent.kvstore import keys as kvkeys

ROOT = "root"
READ, READWRITE = "read", "readwrite"  # etcd's permission types (etcd also has "write")


@attrs.frozen
class Grant:
    """``permission`` on one key, or on every key starting with it (``prefix``)."""

    permission: str  # READ or READWRITE
    key: str
    prefix: bool

    def etcdctl(self, role: str) -> list[str]:
        return ["role", "grant-permission", *(["--prefix"] if self.prefix else []), role,
                self.permission, self.key]

    def covers(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


def key(permission: str, name: str) -> Grant:
    return Grant(permission, name, prefix=False)


def prefix(permission: str, name: str) -> Grant:
    if not name.endswith("/"):
        raise ValueError(f"a prefix grant ends with '/': {name!r}")
    return Grant(permission, name, prefix=True)


@attrs.frozen
class Role:
    """A role and the user of the same name (the CN of its certificate)."""

    name: str
    holder: str  # who is given the certificate
    grants: tuple[Grant, ...]

    def may_read(self, name: str) -> bool:
        return any(g.covers(name) for g in self.grants)

    def may_write(self, name: str) -> bool:
        return any(g.permission == READWRITE and g.covers(name) for g in self.grants)


def roles(cluster: str) -> tuple[Role, ...]:
    """The roles of ``cluster``'s etcd (the cluster whose state it holds)."""
    own_config = kvkeys.cluster_config_key(cluster)
    own_synced = f"{kvkeys.SYNCED}{cluster}/"
    return (
        Role("remote", "every other cluster (its clustermesh file and KVStoreMesh's)", (
            key(READ, kvkeys.HEARTBEAT),
            prefix(READ, STATE),
            key(READ, own_config),
            prefix(READ, own_synced),
        )),
        Role("agent", "this cluster's agents (--etcd-config)", (
            prefix(READWRITE, STATE),
            key(READWRITE, kvkeys.HEARTBEAT),
            key(READWRITE, own_config),
            prefix(READWRITE, own_synced),
            prefix(READWRITE, kvkeys.POLICIES),
            prefix(READWRITE, kvkeys.LOCAL_SERVICES),
            key(READWRITE, kvkeys.IDENTITY_GC),
            prefix(READ, "cilium/"),
        )),
        Role("kvstoremesh", "this cluster's KVStoreMesh (its --etcd-config)", (
            prefix(READWRITE, CACHE),
            prefix(READWRITE, kvkeys.CLUSTER_CONFIG),
            prefix(READWRITE, kvkeys.SYNCED),
            prefix(READWRITE, kvkeys.KVSTOREMESH),  # its leader key
            key(READ, kvkeys.HEARTBEAT),
        )),
        Role("local", "this cluster's agents reading KVStoreMesh's cache via a clustermesh file", (
            key(READ, kvkeys.HEARTBEAT),
            prefix(READ, CACHE),
            prefix(READ, kvkeys.CLUSTER_CONFIG),
            prefix(READ, kvkeys.SYNCED),
        )),
    )


USERS = (ROOT, "remote", "agent", "kvstoremesh", "local")


def etcdctl_commands(cluster: str) -> list[list[str]]:
    """The etcdctl commands that set up ``cluster``'s etcd, in order; ``auth enable`` last
    (from then on every client needs a certificate naming a user)."""
    commands = [["user", "add", ROOT, "--no-password"], ["user", "grant-role", ROOT, ROOT]]
    for role in roles(cluster):
        commands += [["role", "add", role.name], *(g.etcdctl(role.name) for g in role.grants),
                     ["user", "add", role.name, "--no-password"],
                     ["user", "grant-role", role.name, role.name]]
    return [*commands, ["auth", "enable"]]
