"""The CLI's side of the agent API: JSON over the unix socket, one line when nobody answers."""

import asyncio
import json as _json
from pathlib import Path
from typing import Any

import aiohttp

from meshagent.api import API_PREFIX
from meshagent.errors import AgentNotRunning, MeshagentError

TIMEOUT = aiohttp.ClientTimeout(total=30, connect=3)


class AgentClient:
    def __init__(self, socket_path: Path):
        self.socket_path = Path(socket_path)

    async def request(self, method: str, path: str, *, params: dict | None = None,
                      json: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        """The decoded JSON answer; raises AgentNotRunning or MeshagentError with the reason."""
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
                async with session.request(method, f"http://meshagent{API_PREFIX}{path}",
                                           params=params, json=json) as response:
                    text = await response.text()
                    try:
                        body = _json.loads(text)
                    except ValueError:
                        body = None
                    if response.status not in ok:
                        error = body.get("error") if isinstance(body, dict) else text.strip()
                        raise MeshagentError(f"agent answered {response.status}: {error}")
                    if body is None and text:
                        raise MeshagentError(f"agent answered {response.status} with something"
                                             f" that is not JSON: {text[:200]!r}")
                    return body
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PermissionError):
                raise MeshagentError(
                    f"permission denied on {self.socket_path}: the agent's socket is for root"
                    " and its group (run as root, or join the socket's group)") from None
            raise AgentNotRunning(
                f"no agent is running: cannot connect to {self.socket_path}"
                f" ({_reason(exc)}); start it with 'meshagent --plugins ...'"
            ) from None
        except PermissionError:
            raise MeshagentError(f"permission denied on {self.socket_path}") from None
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunning(
                f"no agent is running: cannot connect to {self.socket_path}"
                f" ({_reason(exc)}); start it with 'meshagent --plugins ...'"
            ) from None
        except asyncio.TimeoutError:
            raise AgentNotRunning(f"the agent at {self.socket_path} did not answer in time") from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return asyncio.run(self.request("GET", path, **kwargs))


def _reason(exc: Exception) -> str:
    cause = getattr(exc, "os_error", None) or exc
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
