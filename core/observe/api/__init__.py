"""Hubble's protobuf definitions (Cilium's api/v1) and the Python generated from them by
``make proto``; never edit a ``*_pb2*`` file by hand."""
