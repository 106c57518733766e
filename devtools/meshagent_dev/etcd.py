"""Real etcd servers for tests: a free port each, plain or TLS with client certificates.

Uses Debian's ``etcd`` binary (etcd-server 3.4). Certificates come from ``trustme``: one CA per
server, a server certificate for 127.0.0.1, and client certificates signed by that CA. With
``auth``, etcd also checks who may do what: the users and roles of
:mod:`meshagent_dev.etcd_roles`, each client known by its certificate's CN.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: held open together while picked, since a port picked
    and closed may be handed out again at once (an etcd's client and peer port once came out
    the same, and it could not bind its own second listener)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EtcdServer:
    """One single-member etcd; ``stop()`` and ``start()`` again keep its data and port."""

    def __init__(self, name: str = "etcd", *, tls: bool = False, workdir: Path | None = None,
                 netns: str | None = None, host: str = "127.0.0.1", auth: str | None = None):
        """``auth``: the name of the cluster this etcd serves; its first start then creates
        that cluster's users and roles (:func:`meshagent_dev.etcd_roles.roles`) and enables
        authentication, and every client file must name its user. Needs ``tls``."""
        if auth is not None and not tls:
            raise ValueError("etcd auth by certificate CN needs tls=True")
        self.name = name
        self.tls = tls
        self.auth = auth
        self.netns = netns  # run inside this network namespace, listening on ``host``
        self.host = host
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"ma-{name}-", dir="/tmp"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.ca = None
        if tls:
            import trustme
            self.ca = trustme.CA()
            server = self.ca.issue_cert(host, "127.0.0.1", "localhost")
            server.cert_chain_pems[0].write_to_path(str(self.dir / "server.crt"))
            write_key(server.private_key_pem, self.dir / "server.key")
            self.ca.cert_pem.write_to_path(str(self.dir / "ca.crt"))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def start(self) -> "EtcdServer":
        peer = f"http://{self.host}:{self.peer_port}"
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        args = [*prefix,
            ETCD, "--name", self.name, "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", str(self.dir / "etcd.log"),
        ]
        if self.tls:
            args += ["--cert-file", str(self.dir / "server.crt"),
                     "--key-file", str(self.dir / "server.key"),
                     "--trusted-ca-file", str(self.dir / "ca.crt"), "--client-cert-auth"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self._listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd {self.name} did not listen: {self.log_tail()}")
            time.sleep(0.05)
        if self.auth is not None and not (self.dir / AUTH_DONE).exists():
            self._set_up_auth()
        return self

    def _set_up_auth(self) -> None:
        """Users, roles and ``auth enable``, once per data directory (they live in it)."""
        from meshagent_dev.etcd_roles import etcdctl_commands
        for command in etcdctl_commands(self.auth):
            self.etcdctl(*command)
        (self.dir / AUTH_DONE).touch()

    def etcdctl(self, *args: str, user: str = "root") -> subprocess.CompletedProcess:
        """Run ``etcdctl`` against this server (in its namespace), as ``user`` when it has
        TLS; raises with etcdctl's error if it fails."""
        command = etcdctl_command(self._user_file(user))
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        result = subprocess.run([*prefix, *command, *args], capture_output=True, text=True,
                                timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} as {user}: {result.stderr.strip()}")
        return result

    def _user_file(self, user: str) -> Path:
        """Where this server keeps its own client file for ``user``, made on first use."""
        path = self.dir / "users" / user
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            self.client_config(path, user=user)
        return path

    def _listening(self) -> bool:
        if self.netns is None:
            with socket.socket() as s:
                return s.connect_ex((self.host, self.client_port)) == 0
        probe = subprocess.run(["ip", "netns", "exec", self.netns, "bash", "-c",
                                f"exec 3<>/dev/tcp/{self.host}/{self.client_port}"],
                               capture_output=True)
        return probe.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join((self.dir / "etcd.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client_config(self, path: Path, *, ca=None, key: str = "ca-file",
                      user: str | None = None) -> Path:
        """Write a clustermesh-style file for this server (client cert signed by ``ca``), for
        the etcd ``user`` (its certificate's CN) when the server runs with auth."""
        if self.auth is not None and user is None:
            raise ValueError(f"etcd {self.name} runs with auth: name the user of {path}")
        data: dict = {"endpoints": [self.url]}
        if self.tls:
            ca = ca or self.ca
            client = ca.issue_cert("meshagent-client", common_name=user)
            stem = path.with_name(path.name + "-etcd-client")
            client.cert_chain_pems[0].write_to_path(f"{stem}.crt")
            write_key(client.private_key_pem, Path(f"{stem}.key"))
            ca.cert_pem.write_to_path(f"{stem}-ca.crt")
            data.update({key: f"{stem}-ca.crt", "cert-file": f"{stem}.crt",
                         "key-file": f"{stem}.key"})
        path.write_text(yaml.safe_dump(data))
        return path


AUTH_DONE = "auth-enabled"  # in the server's directory, once its users exist


def etcdctl_command(config: Path) -> list[str]:
    """``etcdctl`` with the endpoints and certificates of a clustermesh-style file."""
    data = yaml.safe_load(Path(config).read_text())
    command = [ETCDCTL, "--endpoints", ",".join(data["endpoints"])]
    ca = data.get("trusted-ca-file") or data.get("ca-file")
    for flag, value in (("--cacert", ca), ("--cert", data.get("cert-file")),
                        ("--key", data.get("key-file"))):
        if value:
            command += [flag, value]
    return command


def write_key(pem, path: Path) -> None:
    """A private key, readable by its owner only (0600) from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem.bytes())
    os.chmod(path, 0o600)
