"""The CLI's HTTP/1.1 client over the unix socket, against answers aiohttp never gives."""

import socket
import threading

import pytest

from meshagent.client import AgentClient
from meshagent.errors import AgentNotRunning, MeshagentError


def serve_once(path, answer: bytes) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        conn, _ = server.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        conn.sendall(answer)
        conn.close()
        server.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_chunked_answer_is_put_together(short_tmp):
    path = short_tmp / "s.sock"
    serve_once(path, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n")
    assert AgentClient(path).get("/x") == {"a": 1}


def test_an_error_answer_names_the_status_and_the_error(short_tmp):
    path = short_tmp / "s.sock"
    body = b'{"error": "no endpoint 7"}'
    serve_once(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body),
                                                                               body))
    with pytest.raises(MeshagentError, match="agent answered 404: no endpoint 7"):
        AgentClient(path).get("/endpoints/7")


def test_something_that_is_not_http_is_a_hang_up(short_tmp):
    path = short_tmp / "s.sock"
    serve_once(path, b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(AgentNotRunning, match="hung up: not an HTTP answer"):
        AgentClient(path).get("/status")
