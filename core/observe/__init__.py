"""Observability in Hubble's terms: its API definitions (``api``), its JSON output
(``jsonformat``) and the gRPC server of its Observer and Peer services."""
