"""An HTTP/1.1 server (Python's http.server) that takes POST bodies, with Content-Length
or chunked, hashes them as they arrive and answers "BYTES SHA256HEX". Nothing is kept, so
a 100 MiB upload costs no memory or disk. Answers `Expect: 100-continue` (http.server does
for HTTP/1.1), which curl sends before a large body. On paths under `/slow` it reads at
most 64 KiB per 2 ms (about 30 MB/s), a slow server whose sender must be held back.

It also answers `GET /headers` with the request's header lines as received (names in the
case the client wrote them), and a response header with mixed case, `X-MiXeD-Case: yes`,
so a test can see what a proxy between them did to headers.

And it plays a hostile destination: `GET /status/CODE/GRPC` is answered with status CODE
(any number from 200 to 999) and `grpc-status: GRPC` (any number) as an empty gRPC
response, to see that the label sets such answers make at a proxy stay capped.

    upload_sink.py PORT    # listens on [::]:PORT (IPv4 too), prints "ready"
"""

import hashlib
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = 1 << 16


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        digest = hashlib.sha256()
        total = 0
        pause = 0.002 if self.path.startswith("/slow") else 0

        def take(length):
            nonlocal total
            while length > 0:
                data = self.rfile.read(min(length, BLOCK))
                if not data:
                    raise ConnectionError("the body ended early")
                digest.update(data)
                total += len(data)
                length -= len(data)
                if pause:
                    time.sleep(pause)

        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(size)
                self.rfile.readline()
        else:
            take(int(self.headers.get("Content-Length", "0")))
        body = f"{total} {digest.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/status/"):
            _, _, code, grpc = self.path.split("/")
            self.send_response(int(code))
            self.send_header("Content-Type", "application/grpc")
            self.send_header("grpc-status", grpc)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/headers":
            self.send_error(404)
            return
        body = "".join(f"{name}: {value}\n" for name, value in self.headers.items()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("X-MiXeD-Case", "yes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: upload_sink.py PORT")
    server = DualStack(("::", int(sys.argv[1])), Sink)
    print("ready", flush=True)
    server.serve_forever()
