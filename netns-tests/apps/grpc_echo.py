"""A gRPC server and client made with the real grpcio (PyPI), for the HTTP netns tests.

No protobuf code generation: the methods take and return raw bytes through grpcio's
generic handlers, which is all a proxy sees anyway.

    grpc_echo.py serve PORT        # listens on [::]:PORT (IPv4 too), prints "ready"
    grpc_echo.py call HOST:PORT    # runs the calls below, prints one JSON object

Methods of service meshtest.Echo:
- Echo (unary): answers the request.
- Missing (unary): fails with status NOT_FOUND (5).
- Chat (bidirectional streaming): answers each message as it arrives. The client sends a
  message only after the answer to the previous one came back, so a hop that held either
  direction back until the other ended would stall the call.
"""

import json
import queue
import sys
from concurrent import futures

import grpc

SERVICE = "meshtest.Echo"
# Sizes of the Chat messages: small ones and one of 1 MiB, so flow control windows
# (64 KiB by default in HTTP/2) must be refilled while the stream stays open.
CHAT_SIZES = [1, 100, 16 * 1024, 1024 * 1024, 7, 64 * 1024 + 1] + [32] * 20


def serve(port):
    def echo(request, context):
        return request

    def missing(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def chat(requests, context):
        for message in requests:
            yield message

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 8 << 20)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(f"[::]:{port}") == 0:
        sys.exit(f"grpc_echo.py: cannot listen on [::]:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def message(i, size):
    """A message whose content depends on its number, so a mix-up shows."""
    return bytes((i * 31 + j) % 251 for j in range(min(size, 251))) * (size // 251 + 1)


def call(target):
    # The environment's http_proxy must not send the test's calls elsewhere.
    channel = grpc.insecure_channel(
        target,
        options=[("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 8 << 20)],
    )
    result = {}

    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    result["echo"] = echo(b"hello through the mesh", timeout=20).decode()

    missing = channel.unary_unary(f"/{SERVICE}/Missing")
    try:
        missing(b"x", timeout=20)
        result["missing"] = {"code": 0}
    except grpc.RpcError as e:
        result["missing"] = {"code": e.code().value[0], "details": e.details()}

    outgoing = queue.Queue()

    def requests():
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    sent = [message(i, size)[:size] for i, size in enumerate(CHAT_SIZES)]
    outgoing.put(sent[0])
    answers = channel.stream_stream(f"/{SERVICE}/Chat")(requests(), timeout=30)
    echoed = 0
    for answer in answers:
        if answer != sent[echoed]:
            result["chat_mismatch_at"] = echoed
            break
        echoed += 1
        outgoing.put(sent[echoed] if echoed < len(sent) else None)
    result["chat"] = {"sent": len(sent), "echoed": echoed, "code": answers.code().value[0]}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "call":
        call(sys.argv[2])
    else:
        sys.exit("usage: grpc_echo.py serve PORT | call HOST:PORT")
