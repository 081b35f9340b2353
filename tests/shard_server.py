"""An HTTP server for a shard folder that counts requests per path and injects faults: the test's
stand-in for object storage behind a flaky network (tests/test_remote.py)."""
import socket
import struct
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("reset", "503", "stall")


class ShardServer:
    """``with ShardServer(folder) as s``: ``s.url`` serves ``folder``. ``s.fail(path, *faults)`` makes
    the next requests for ``path`` (relative to the folder) fail in that order:
    ``reset`` half the body, then a TCP reset; ``503`` Service Unavailable; ``stall`` half the body,
    then nothing for ``stall_s`` seconds. ``s.requests[path]`` counts every request."""

    def __init__(self, root: Path, stall_s: float = 30.0):
        self.root, self.stall_s = Path(root), stall_s
        self.requests, self.faults, self.lock = Counter(), {}, threading.Lock()
        self.release = threading.Event()  # ends stalls at shutdown
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kw):
                super().__init__(*args, directory=str(server.root), **kw)

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                with server.lock:
                    server.requests[path] += 1
                    queue = server.faults.get(path, [])
                    fault = queue.pop(0) if queue else None
                if fault is None:
                    return super().do_GET()
                if fault == "503":
                    return self.send_error(503, "Service Unavailable")
                self._half_body(path)
                if fault == "stall":
                    server.release.wait(server.stall_s)
                else:  # SO_LINGER 0: close() sends RST, as a dropped connection does
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _half_body(self, path):
                data = (server.root / path).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def fail(self, path: str, *faults: str) -> None:
        assert set(faults) <= set(FAULTS), faults
        with self.lock:
            self.faults.setdefault(path, []).extend(faults)

    def shard_requests(self) -> int:
        with self.lock:
            return sum(n for p, n in self.requests.items() if p.endswith(".tar"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
