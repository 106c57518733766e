"""ClusterMesh: the remote clusters of ``--clustermesh-config``, kept in step with the agent's
tables (written against the kvstore contract only), who may claim which addresses, and the
routes to remote nodes' pod CIDRs."""
