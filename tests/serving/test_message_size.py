"""--grpc-max-recv-msg-size / --grpc-max-send-msg-size on the ext_proc server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
import pytest

from epp.app import DEFAULT_MAX_MESSAGE_BYTES, ext_proc_grpc_options
from epp.settings import parse_settings
from tests.support.epp_app import running_epp
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


def body(size: int) -> bytes:
    return orjson.dumps({"model": "m", "prompt": "x" * size})


async def test_receive_limit(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address, "--grpc-max-recv-msg-size", "64KiB") as epp:
        replies = await one_request(epp.stub, request_headers(), body(50_000), chunk=60_000)
        assert replies[-1].request_body.response.body_mutation.streamed_response.end_of_stream
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await one_request(epp.stub, request_headers(), body(100_000), chunk=100_000)  # one 100 kB message
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_send_limit(fake: FakeVllm) -> None:
    # epp streams the body back in 62,000-byte messages: above a 32 KiB send limit.
    async with running_epp("--endpoints", fake.address, "--grpc-max-send-msg-size", "32KiB") as epp:
        replies = await one_request(epp.stub, request_headers(), body(20_000), chunk=10_000)
        assert replies[-1].request_body.response.body_mutation.streamed_response.end_of_stream
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await one_request(epp.stub, request_headers(), body(100_000), chunk=10_000)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_default_is_16_mib_each_way(fake: FakeVllm) -> None:
    options = dict(ext_proc_grpc_options(parse_settings(["--endpoints", "a:1"])))
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 16 * 2**20
    assert DEFAULT_MAX_MESSAGE_BYTES == 16 * 2**20
    # 0 means the default, as in Go.
    zero = parse_settings(["--endpoints", "a:1", "--grpc-max-recv-msg-size", "0"])
    assert dict(ext_proc_grpc_options(zero))["grpc.max_receive_message_length"] == 16 * 2**20
    async with running_epp("--endpoints", fake.address) as epp:
        # A 6 MB message: above gRPC's own 4 MiB default, within epp's.
        replies = await one_request(epp.stub, request_headers(), body(6_000_000), chunk=6_100_000)
        assert replies[-1].request_body.response.body_mutation.streamed_response.end_of_stream
