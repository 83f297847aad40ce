"""WebSocket over HTTP/2 (RFC 8441, extended CONNECT) for the netns tests.

    ws_h2.py serve PORT
    ws_h2.py call HOST PORT [--count N] [--size BYTES]
    ws_h2.py stall HOST PORT [--size BYTES] [--hold SECONDS]

- `serve`: hypercorn (PyPI) serving an echo WebSocket over cleartext HTTP/2 (prior
  knowledge) and HTTP/1.1 on PORT: every message comes back as it was sent.
- `call`: one extended CONNECT (`:protocol websocket`) in raw frames (hyperframe and
  hpack, through `h2_attack.Conn`), then --count binary messages of --size bytes, each
  waited for. Reports the response status, the messages sent and echoed, and the first
  that came back different.
- `stall`: the same tunnel with stream windows of 0 (SETTINGS_INITIAL_WINDOW_SIZE), one
  message of --size bytes whose echo the server can then not send, and the socket read
  for --hold seconds without opening the tunnel's window. Reports whether and when (after
  the message was sent) the tunnel's stream was reset.

Each client mode prints one JSON object on stdout.
"""

import argparse
import asyncio
import json
import os
import struct
import sys
import time

from h2_attack import Conn
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

MAX_FRAME = 16384


async def echo_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"websocket only\n"})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": message["text"]})


def serve(port):
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    # One dual-stack socket: IPv4 clients arrive as v4-mapped addresses.
    config.bind = [f"[::]:{port}"]
    config.websocket_max_message_size = 64 << 20
    config.loglevel = "WARNING"
    asyncio.run(hypercorn_serve(echo_app, config))


def ws_frame(payload):
    """A masked binary WebSocket frame, as a client must send it."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x82, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", n)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return head + mask + masked


def ws_messages(buf):
    """The complete unmasked frames' payloads at the start of `buf`, and what is left."""
    messages = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        at = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack(">Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        messages.append(buf[at : at + n])
        buf = buf[at + n :]
    return messages, buf


class Tunnel:
    """An extended CONNECT stream on `conn`, its received bytes kept in order."""

    def __init__(self, conn, args):
        self.conn = conn
        self.stream = conn.new_stream()
        block = conn.encoder.encode(
            [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":authority", conn.authority),
                (":path", "/"),
                ("sec-websocket-version", "13"),
            ]
        )
        conn.send([HeadersFrame(self.stream, block, flags=["END_HEADERS"])])
        self.received = b""
        self.seen = 0

    def send(self, data):
        frames = [DataFrame(self.stream, data[i : i + MAX_FRAME]) for i in range(0, len(data), MAX_FRAME)]
        self.conn.send(frames)

    def pump(self, seconds, grant=True):
        """Reads for up to `seconds`, keeping the tunnel's bytes (and opening the
        windows by as much, when `grant`)."""
        self.conn.read(seconds)
        got = self.conn.kept.get(self.stream, b"")
        new = got[self.seen :]
        self.seen = len(got)
        self.received += new
        if grant and new and not self.conn.closed:
            self.conn.send(
                [
                    WindowUpdateFrame(self.stream, window_increment=len(new)),
                    WindowUpdateFrame(0, window_increment=len(new)),
                ]
            )


def call(args):
    conn = Conn(args)
    conn.kept = {}
    tunnel = Tunnel(conn, args)
    deadline = time.monotonic() + 5
    while tunnel.stream not in conn.status_of and not conn.closed and time.monotonic() < deadline:
        tunnel.pump(0.1)
    result = {"status": conn.status_of.get(tunnel.stream), "sent": 0, "echoed": 0}
    if result["status"] != "200":
        return conn, result
    pending = b""
    for i in range(args.count):
        payload = bytes([i % 251]) * args.size
        tunnel.send(ws_frame(payload))
        result["sent"] += 1
        deadline = time.monotonic() + 10
        while not conn.closed and time.monotonic() < deadline:
            tunnel.pump(0.05)
            messages, pending = ws_messages(tunnel.received)
            if messages:
                tunnel.received = pending
                break
        else:
            break
        result["echoed"] += len(messages)
        if messages[0] != payload and "mismatch_at" not in result:
            result["mismatch_at"] = i
    return conn, result


def stall(args):
    conn = Conn(args)
    conn.kept = {}
    conn.send([SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})])
    tunnel = Tunnel(conn, args)
    deadline = time.monotonic() + 5
    while tunnel.stream not in conn.status_of and not conn.closed and time.monotonic() < deadline:
        tunnel.pump(0.1, grant=False)
    result = {"status": conn.status_of.get(tunnel.stream)}
    if result["status"] != "200":
        return conn, result
    tunnel.send(ws_frame(b"x" * args.size))
    sent_at = time.monotonic()
    deadline = sent_at + args.hold
    while not conn.closed and tunnel.stream not in conn.reset_of and time.monotonic() < deadline:
        tunnel.pump(min(0.2, deadline - time.monotonic()), grant=False)
    reset = conn.reset_of.get(tunnel.stream)
    result.update(
        {
            "received": len(tunnel.received),
            "reset_code": reset[1] if reset else None,
            "reset_after": round(reset[0] - sent_at, 3) if reset else None,
        }
    )
    return conn, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "call", "stall"])
    parser.add_argument("rest", nargs="+")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--hold", type=float, default=5.0)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(int(args.rest[0]))
        return
    args.host, args.port = args.rest[0], int(args.rest[1])
    args.tls, args.authority = None, None
    started = time.monotonic()
    conn, result = (call if args.mode == "call" else stall)(args)
    result["closed"] = conn.closed
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
