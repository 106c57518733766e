"""Hubble's ``observer`` package: observer.proto and its generated modules."""
