"""Hubble's ``flow`` package: flow.proto and its generated modules."""
