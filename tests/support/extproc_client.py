"""Drive epp's ext_proc server the way Envoy does: one gRPC stream per HTTP request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import orjson
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2


def headers_msg(
    headers: dict[str, str],
    end_of_stream: bool = False,
    subset: list[str] | None = None,
    response: bool = False,
    served: str | None = None,
) -> pb.ProcessingRequest:
    """A headers message; `subset` adds Envoy's subset hint, `served` (response headers) the
    `envoy.lb` / `x-gateway-destination-endpoint-served` metadata naming the endpoint that served."""
    hm = core_pb.HeaderMap(
        headers=[core_pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )
    http_headers = pb.HttpHeaders(headers=hm, end_of_stream=end_of_stream)
    msg = (
        pb.ProcessingRequest(response_headers=http_headers)
        if response
        else pb.ProcessingRequest(request_headers=http_headers)
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    if served is not None:
        lb = struct_pb2.Struct()
        lb.update({"x-gateway-destination-endpoint-served": served})
        msg.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return msg


def body_msgs(
    body: bytes, chunk: int, response: bool = False, end: bool = True
) -> list[pb.ProcessingRequest]:
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    out = []
    for i, part in enumerate(parts):
        b = pb.HttpBody(body=part, end_of_stream=end and i == len(parts) - 1)
        out.append(
            pb.ProcessingRequest(response_body=b) if response else pb.ProcessingRequest(request_body=b)
        )
    return out


def request_headers(path: str = "/v1/completions", **extra: str) -> dict[str, str]:
    return {":method": "POST", ":path": path, ":authority": "gw", "content-type": "application/json", **extra}


class ExtProcClient:
    """An open ext_proc stream: send messages, read replies, like Envoy."""

    def __init__(self, stub: pb_grpc.ExternalProcessorStub) -> None:
        self._queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self._call = stub.Process(self._requests())

    async def _requests(self) -> AsyncIterator[pb.ProcessingRequest]:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            yield msg

    def send(self, msgs: Iterable[pb.ProcessingRequest]) -> None:
        for m in msgs:
            self._queue.put_nowait(m)

    async def read(self, n: int, timeout: float = 5.0) -> list[pb.ProcessingResponse]:
        return [await asyncio.wait_for(self._call.read(), timeout) for _ in range(n)]

    async def close(self) -> None:
        self._queue.put_nowait(None)

    def cancel(self) -> None:
        self._call.cancel()


async def one_request(
    stub: pb_grpc.ExternalProcessorStub,
    headers: dict[str, str],
    body: bytes,
    chunk: int = 16_384,
    subset: list[str] | None = None,
) -> list[pb.ProcessingResponse]:
    """Send a whole request (headers, body in chunks) and collect every reply until the stream ends
    or the body has been sent back with end_of_stream / an immediate response arrives."""
    client = ExtProcClient(stub)
    client.send([headers_msg(headers, subset=subset), *body_msgs(body, chunk)])
    replies: list[pb.ProcessingResponse] = []
    try:
        while True:
            reply = await asyncio.wait_for(client._call.read(), 5.0)
            if reply is grpc.aio.EOF:
                break
            replies.append(reply)
            if reply.HasField("immediate_response"):
                break
            if (
                reply.HasField("request_body")
                and reply.request_body.response.body_mutation.streamed_response.end_of_stream
            ):
                break
    finally:
        await client.close()
    return replies


async def exchange(
    client: ExtProcClient, headers: dict[str, str] | None = None, served: str | None = None
) -> tuple[str, dict[str, str]]:
    """One request and its response, as Envoy sends them: (the destination epp picked, the headers
    epp adds to the response). `headers` go on the request, `served` is Envoy's report of the
    endpoint that answered."""
    body = orjson.dumps({"model": "m", "prompt": "hello"})
    client.send([headers_msg(request_headers(**(headers or {}))), *body_msgs(body, 1000)])
    routed = await client.read(2)
    mutation = routed[0].request_headers.response.header_mutation
    destination = next(
        h.header.raw_value.decode()
        for h in mutation.set_headers
        if h.header.key == "x-gateway-destination-endpoint"
    )
    status = {":status": "200", "content-type": "application/json"}
    client.send([headers_msg(status, response=True, served=served)])
    (reply,) = await client.read(1)
    added = {
        h.header.key: h.header.raw_value.decode()
        for h in reply.response_headers.response.header_mutation.set_headers
    }
    client.send(body_msgs(b'{"choices": []}', 1000, response=True))
    await client.read(1)
    await client.close()
    return destination, added
