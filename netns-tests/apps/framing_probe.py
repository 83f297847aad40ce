"""A destination that records how each HTTP/1.1 request it gets is framed, for the request
smuggling tests (netns-tests/tests/attack.rs): a proxy that forwards a body framed two
ways (`Content-Length` and `Transfer-Encoding`), or framed one way and sent another,
lets a request hide in another's body, and the destination see one the proxy never did.

    framing_probe.py PORT LOG    # listens on [::]:PORT (IPv4 too), prints "ready"

Each connection is read until its request head, then 300 ms more for the body; answered
`200` with `Connection: close`; then read until the peer closes (at most 2 s). One JSON
line per connection goes to LOG: the request line, whether it carried `Content-Length`,
`Transfer-Encoding`, or both, whether the body was complete as the head frames it, and
how many bytes came after it (a smuggled request).
"""

import json
import socket
import sys
import threading
import time


def frame(data):
    """What the head of `data` says of its body, and what follows the body."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip().lower())
    lengths = fields.get(b"content-length", [])
    encodings = fields.get(b"transfer-encoding", [])
    report = {
        "request_line": lines[0].decode("latin-1"),
        "content_length": [v.decode() for v in lengths],
        "transfer_encoding": [v.decode() for v in encodings],
        "complete": False,
        "leftover": 0,
    }
    if encodings and encodings[-1].endswith(b"chunked"):
        at = 0
        while True:
            size_line, crlf, after = rest[at:].partition(b"\r\n")
            if not crlf:
                return report
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                return report
            at += len(size_line) + 2
            if size == 0:
                trailer_end = rest.find(b"\r\n\r\n", at - 2)
                if trailer_end < 0:
                    return report
                at = trailer_end + 4
                break
            at += size + 2
            if at > len(rest):
                return report
        report["complete"] = True
        report["leftover"] = len(rest) - at
    elif lengths:
        n = int(lengths[0])
        report["complete"] = len(rest) >= n
        report["leftover"] = max(0, len(rest) - n)
    else:
        report["complete"] = True
        report["leftover"] = len(rest)
    return report


def serve_one(conn, log, lock):
    conn.settimeout(2)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        deadline = time.monotonic() + 0.3
        conn.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        conn.close()
    if data:
        with lock, open(log, "a") as out:
            out.write(json.dumps(frame(data)) + "\n")


def main():
    port, log = int(sys.argv[1]), sys.argv[2]
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", port))
    server.listen(128)
    print("ready", flush=True)
    lock = threading.Lock()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn, log, lock), daemon=True).start()


if __name__ == "__main__":
    main()
