"""Hubble's ``peer`` package: peer.proto and its generated modules."""
