"""Development tools for meshagent, kept out of the product package: the lab (hosts and pods
as network namespaces), an etcd server runner, and in-process stand-ins for the Consul and
Kubernetes HTTP APIs. Installed by ``make setup``; used by the tests, the demo and the
benchmarks. ``meshagent lab`` runs :mod:`meshagent_dev.lab`."""
