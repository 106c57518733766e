"""Values the agent passes around (clusters, nodes, identities, endpoints, ipcache entries,
services), their Cilium JSON codecs, and the tables that hold them. They import no component."""
