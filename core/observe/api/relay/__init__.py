"""Hubble's ``relay`` package: relay.proto and its generated modules."""
