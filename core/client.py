"""The CLI's side of the agent API: JSON over the unix socket, one line when nobody answers.

Standard library only (``http.client`` over ``AF_UNIX``): every ``meshagent status`` pays for
what this imports, and an HTTP client framework costs more than the request.
"""

import http.client
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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path):
        super().__init__("meshagent", timeout=TIMEOUT)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(str(self.socket_path))
            sock.settimeout(TIMEOUT)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: Path):
        self.socket_path = Path(socket_path)

    def call(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
             ok: tuple[int, ...] = (200,)) -> Any:
        """The decoded JSON answer; raises AgentNotRunning or MeshagentError with the reason."""
        url = API_PREFIX + path
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        body = None if json is None else _json.dumps(json).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection = _UnixConnection(self.socket_path)
        try:
            try:
                connection.connect()
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
                connection.request(method, url, body=body, headers=headers)
                response = connection.getresponse()
                text = response.read().decode("utf-8", "replace")
            except TimeoutError:
                raise AgentNotRunning(
                    f"the agent at {self.socket_path} did not answer in time") from None
            except (OSError, http.client.HTTPException) as exc:
                raise AgentNotRunning(f"the agent at {self.socket_path} hung up: {exc}") from None
        finally:
            connection.close()
        try:
            answer = _json.loads(text)
        except ValueError:
            answer = None
        if response.status not in ok:
            error = answer.get("error") if isinstance(answer, dict) else text.strip()
            raise MeshagentError(f"agent answered {response.status}: {error}")
        if answer is None and text:
            raise MeshagentError(f"agent answered {response.status} with something that is"
                                 f" not JSON: {text[:200]!r}")
        return answer

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`call` from a coroutine, in a thread: the event loop (maybe the agent's own)
        keeps running meanwhile."""
        import asyncio
        return await asyncio.to_thread(self.call, method, path, **kwargs)
