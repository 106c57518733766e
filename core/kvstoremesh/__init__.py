"""KVStoreMesh: one process per cluster caches every remote cluster in the local kvstore, so
agents read remote clusters from their own kvstore (Cilium's KVStoreMesh, its default since
1.16): one watcher per remote cluster and kind instead of one per agent.
"""
