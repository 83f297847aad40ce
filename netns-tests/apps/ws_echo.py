"""A WebSocket echo server and client made with the real `websockets` (PyPI), for the
HTTP netns tests.

    ws_echo.py serve PORT     # listens on every address (IPv4 and IPv6), prints "ready"
    ws_echo.py call URI       # sends the messages below one by one, prints one JSON object

The client sends text and binary messages (one of 1 MiB) and waits for each echo before
sending the next, so both directions of the upgraded connection are used in turn.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

MESSAGES = ["hello", "through the mesh", b"\x00\x01\x02binary", bytes(range(256)) * 4096] + [
    f"message {i}" for i in range(50)
]


async def run_server(port):
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    # host None: every address of both families.
    async with serve(echo, None, port, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


async def run_client(uri):
    result = {"sent": len(MESSAGES), "echoed": 0}
    # proxy=None: the environment's proxy settings must not send the test elsewhere.
    async with connect(uri, proxy=None, max_size=None, open_timeout=20) as ws:
        result["status"] = ws.response.status_code
        for message in MESSAGES:
            await ws.send(message)
            answer = await asyncio.wait_for(ws.recv(), 20)
            if answer != message:
                result["mismatch_at"] = result["echoed"]
                break
            result["echoed"] += 1
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        asyncio.run(run_server(int(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "call":
        asyncio.run(run_client(sys.argv[2]))
    else:
        sys.exit("usage: ws_echo.py serve PORT | call URI")
