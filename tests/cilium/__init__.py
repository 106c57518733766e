"""Cilium's side of the ClusterMesh formats, built from Cilium's source (not from meshagent's
code): ``meshagent_dev.cilium`` writes a cluster into etcd exactly as Cilium 1.17 does; ``reader`` decodes
what meshagent writes the way Cilium's agents and KVStoreMesh do.

Every golden value and decoder rule names the file of github.com/cilium/cilium it follows
(docs/…/style.md, "Speaking someone else's format")."""
