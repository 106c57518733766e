"""The CLI's side of the agent API: JSON over the unix socket, one line when nobody answers.

Standard library only, and not even ``http.client`` (its email parser costs ~25 ms): one
HTTP/1.1 request per connection (``Connection: close``), the answer read to the end. Every
``meshagent status`` pays for what this imports.
"""

import json as _json
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from meshagent.errors import AgentNotRunning, MeshagentError

API_PREFIX = "/v1"  # both ends: the server mounts every route under it
DEFAULT_SOCKET = Path("/var/run/meshagent/meshagent.sock")  # --socket-path's default
CONNECT_TIMEOUT = 3.0
TIMEOUT = 30.0
MAX_ANSWER_BYTES = 256 * 1024 * 1024


class _BadAnswer(Exception):
    """The bytes that came back are not an HTTP/1.1 answer."""


def _exchange(sock: socket.socket, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
    """Send one request, read the answer to the end: (status, body)."""
    head = [f"{method} {url} HTTP/1.1", "Host: meshagent", "Connection: close",
            "Accept: application/json", f"Content-Length: {len(body or b'')}"]
    if body is not None:
        head.append("Content-Type: application/json")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
    chunks, size = [], 0
    while data := sock.recv(65536):
        chunks.append(data)
        size += len(data)
        if size > MAX_ANSWER_BYTES:
            raise _BadAnswer(f"answer larger than {MAX_ANSWER_BYTES} bytes")
    raw = b"".join(chunks)
    header, sep, payload = raw.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _BadAnswer(f"not an HTTP answer: {raw[:80]!r}")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        payload = _unchunk(payload)
    elif "content-length" in fields:
        payload = payload[:int(fields["content-length"])]
    return int(parts[1]), payload


def _unchunk(data: bytes) -> bytes:
    out, rest = [], data
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise _BadAnswer("truncated chunked answer")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(rest[:size])
        rest = rest[size + 2:]


class AgentClient:
    def __init__(self, socket_path: Path):
        self.socket_path = Path(socket_path)

    def call(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
             ok: tuple[int, ...] = (200,), timeout: float = TIMEOUT) -> Any:
        """The decoded JSON answer; raises AgentNotRunning or MeshagentError with the reason.
        ``timeout``: how long the answer may take (longer for a request that waits)."""
        url = API_PREFIX + path
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        body = None if json is None else _json.dumps(json).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(str(self.socket_path))
                sock.settimeout(timeout)
            except PermissionError:
                raise MeshagentError(
                    f"permission denied on {self.socket_path}: the agent's socket is for root"
                    " and its group (run as root, or join the socket's group)") from None
            except OSError as exc:
                raise AgentNotRunning(
                    f"no agent is running: cannot connect to {self.socket_path}"
                    f" ({exc.strerror or exc}); start it with 'meshagent --plugins ...'"
                ) from None
            try:
                status, payload = _exchange(sock, method, url, body)
            except TimeoutError:
                raise AgentNotRunning(
                    f"the agent at {self.socket_path} did not answer in time") from None
            except (OSError, _BadAnswer, ValueError) as exc:
                raise AgentNotRunning(f"the agent at {self.socket_path} hung up: {exc}") from None
        finally:
            sock.close()
        text = payload.decode("utf-8", "replace")
        try:
            answer = _json.loads(text)
        except ValueError:
            answer = None
        if status not in ok:
            error = answer.get("error") if isinstance(answer, dict) else text.strip()
            raise MeshagentError(f"agent answered {status}: {error}")
        if answer is None and text:
            raise MeshagentError(f"agent answered {status} with something that is"
                                 f" not JSON: {text[:200]!r}")
        return answer

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`call` from a coroutine, in a thread: the event loop (maybe the agent's own)
        keeps running meanwhile."""
        import asyncio
        return await asyncio.to_thread(self.call, method, path, **kwargs)
