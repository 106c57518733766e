"""Tiny TCP/UDP echo server and one-shot clients, run inside test namespaces."""

SERVER = r'''
import socket, sys, threading
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(2); data = c.recv(100); c.sendall(b"PONG:" + data)
        except OSError:
            pass
        c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(100); s.sendto(b"PONG:" + data, peer)
threads = [threading.Thread(target=tcp, args=(int(p),), daemon=True) for p in sys.argv[1].split(",")]
threads += [threading.Thread(target=udp, args=(int(p),), daemon=True) for p in sys.argv[2].split(",")]
for t in threads: t.start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sport = int(sys.argv[4]) if len(sys.argv) > 4 else 0
timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
try:
    if proto == "tcp":
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport)); s.settimeout(timeout); s.connect((host, port))
        s.sendall(b"ping"); reply = s.recv(100)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport)); s.settimeout(timeout)
        s.sendto(b"ping", (host, port)); reply, _ = s.recvfrom(100)
    print("ok" if reply.startswith(b"PONG") else "bad"); sys.exit(0)
except socket.timeout:
    print("timeout"); sys.exit(1)
except OSError as exc:
    print(f"error {exc}"); sys.exit(2)
'''

LOOP = r'''
import socket, sys, time
host, port, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ok = fail = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.create_connection((host, port), timeout=1.0); s.sendall(b"x")
        ok += s.recv(100).startswith(b"PONG"); s.close()
    except OSError:
        fail += 1
    time.sleep(0.05)
open(out, "w").write(f"{ok} {fail}")
'''

# A UDP server answering with the size of each datagram it got, and a client sending one datagram
# of a given size: whether a datagram larger than the MTU (fragmented) arrives whole.
BIG_UDP_SERVER = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535); s.sendto(str(len(data)).encode(), peer)
'''
BIG_UDP_CLIENT = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(b"x" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recvfrom(100)[0].decode())
except socket.timeout:
    print("timeout")
'''
