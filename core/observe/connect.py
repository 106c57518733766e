"""Dialling a Hubble server with grpc.aio: TLS credentials from Hubble's CLI flags, a channel,
its readiness within the dial timeout, and Hubble's text for a failed call."""

import argparse
import asyncio

from meshagent.errors import MeshagentError, UsageError


def credentials(args: argparse.Namespace):
    """gRPC TLS credentials from the --tls-* flags (CA files, client certificate)."""
    import grpc
    if args.tls_allow_insecure:
        raise UsageError("--tls-allow-insecure is not supported: give the CA with"
                         " --tls-ca-cert-files")
    if bool(args.tls_client_cert_file) != bool(args.tls_client_key_file):
        raise UsageError("--tls-client-cert-file and --tls-client-key-file go together")

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot load cert '{path}': {exc.strerror}") from None
    cas = [read(path) for item in args.tls_ca_cert_files for path in item.split(",") if path]
    return grpc.ssl_channel_credentials(
        root_certificates=b"\n".join(cas) or None,
        private_key=read(args.tls_client_key_file) if args.tls_client_key_file else None,
        certificate_chain=read(args.tls_client_cert_file) if args.tls_client_cert_file else None)


def open_channel(target: str, creds=None, server_name: str = ""):
    """A grpc.aio channel to ``target``, over TLS when ``creds`` is given."""
    import grpc
    if creds is None:
        return grpc.aio.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(target, creds, options=options)


async def wait_ready(channel, target: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        raise MeshagentError(f"cannot connect to the Hubble server at {target} within"
                             f" {timeout:g}s") from None


def rpc_error_text(exc) -> str:
    """What Hubble prints for a failed call: the message alone for UNKNOWN, else code and
    message."""
    import grpc
    if exc.code() == grpc.StatusCode.UNKNOWN:
        return exc.details() or "unknown error"
    return f"rpc error: code = {exc.code().name.title().replace('_', '')} desc = {exc.details()}"
