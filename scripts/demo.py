"""`make demo`: hopcat's main job end to end on loopback, with its -v timeline and the figures.

Starts the built-in proxy (``hopcat serve`` on a free loopback port) and a target that reads
everything it is sent while sending its own stream, runs
``hopcat -v -x socks5h://PROXY 127.0.0.1 PORT`` with stdin and stdout as pipes (as ssh's
ProxyCommand gets them), and checks SHA-256 of every byte in both directions.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZE = int(os.environ.get("DEMO_BYTES", 256 << 20))
BLOCK = hashlib.sha256(b"hopcat demo").digest() * (1 << 15)  # 1 MiB


def stream(size: int) -> bytes:
    reps, rest = divmod(size, len(BLOCK))
    return BLOCK * reps + BLOCK[:rest]


def hopcat_command() -> list[str]:
    script = Path(sys.executable).with_name("hopcat")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hopcat"]


def start_proxy() -> tuple[subprocess.Popen[bytes], str]:
    """hopcat serve on a free loopback port; returns it and its HOST:PORT once it accepts."""
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        [*hopcat_command(), "serve", "127.0.0.1:0", "--ready-fd", str(ready_w)],
        pass_fds=(ready_w,), stderr=subprocess.PIPE,
    )
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        address = ready.read().decode().split()[0]
    return proc, address


def serve(listener: socket.socket, payload: bytes, result: dict[str, object]) -> None:
    conn, _ = listener.accept()
    with conn:
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        digest, count = hashlib.sha256(), 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            count += len(data)
        sender.join()
        result.update(count=count, sha=digest.hexdigest())


def main() -> int:
    payload = stream(SIZE)
    want = hashlib.sha256(payload).hexdigest()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_result: dict[str, object] = {}
    server = threading.Thread(target=serve, args=(listener, payload, server_result))
    server.start()

    proxy, proxy_address = start_proxy()
    print(f"demo: hopcat serve listening on {proxy_address} (SOCKS4/4a/5 and HTTP CONNECT)")
    print(f"demo: target on 127.0.0.1:{port}; moving {SIZE >> 20} MiB each way through "
          f"hopcat -v -x socks5h://{proxy_address}\n")
    sys.stdout.flush()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*hopcat_command(), "-v", "-x", f"socks5h://{proxy_address}", "127.0.0.1", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    feeder = threading.Thread(target=lambda: (proc.stdin.write(payload), proc.stdin.close()))  # type: ignore[union-attr]
    feeder.start()
    digest, received = hashlib.sha256(), 0
    while data := proc.stdout.read(1 << 20):
        digest.update(data)
        received += len(data)
    code = proc.wait()
    elapsed = time.perf_counter() - started
    feeder.join()
    server.join()
    listener.close()
    proxy.terminate()  # SIGTERM: stop accepting, drain (nothing open now), exit 0
    _out, proxy_log = proxy.communicate(timeout=30)

    up_ok = server_result.get("sha") == want and server_result.get("count") == SIZE
    down_ok = digest.hexdigest() == want and received == SIZE
    print()
    print("demo: the server's log line for the tunnel:")
    for line in proxy_log.decode(errors="replace").splitlines():
        if "event=tunnel" in line:
            print(f"  {line}")
    print(f"demo: hopcat exit code {code}, hopcat serve exit code {proxy.returncode}")
    print(f"demo: upload   {SIZE} bytes, SHA-256 {'match' if up_ok else 'MISMATCH'}")
    print(f"demo: download {received} bytes, SHA-256 {'match' if down_ok else 'MISMATCH'}")
    print(f"demo: {2 * SIZE / elapsed / 1e6:.0f} MB/s both directions together "
          f"({elapsed:.2f} s wall, including start-up)")
    return 0 if code == 0 and proxy.returncode == 0 and up_ok and down_ok else 1


if __name__ == "__main__":
    sys.exit(main())
