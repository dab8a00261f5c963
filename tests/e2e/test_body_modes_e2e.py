"""A gateway whose ext_proc filter sends bodies in a mode epp does not speak, through a real
Envoy. epp (as the Go EPP) needs the request body in FULL_DUPLEX_STREAMED mode, and the response
body in that mode or not at all. Envoy says which modes it uses in the stream's first message
(`protocol_config`); a request through a gateway set otherwise gets a 500 at once that names the
setting, where it used to wait for a body that never came (NONE) or for a reply Envoy never
sends (BUFFERED, STREAMED).

Not skippable: without the Envoy binary the test fails and says to run `make tools`.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import pytest

from epp_bench.gateway import EnvoyGateway, EppProcess
from tests.support.fake_vllm import FakeVllm
from tests.support.gateway_stack import require_envoy

pytestmark = pytest.mark.timeout(90)


def processing_mode(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter's processing_mode in a rendered Envoy bootstrap."""
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    mode: dict[str, Any] = ext_proc["typed_config"]["processing_mode"]
    return mode


@pytest.mark.parametrize(
    ("request_mode", "response_mode", "named"),
    [
        ("BUFFERED", "FULL_DUPLEX_STREAMED", b"request_body_mode BUFFERED"),
        ("STREAMED", "FULL_DUPLEX_STREAMED", b"request_body_mode STREAMED"),
        ("NONE", "FULL_DUPLEX_STREAMED", b"request_body_mode NONE"),
        ("FULL_DUPLEX_STREAMED", "BUFFERED", b"response_body_mode BUFFERED"),
    ],
)
async def test_a_gateway_sending_bodies_in_another_mode_gets_a_500_naming_it(
    request_mode: str, response_mode: str, named: bytes
) -> None:
    require_envoy()
    async with AsyncExitStack() as cleanup:
        fake = await FakeVllm("a").start()
        cleanup.push_async_callback(fake.stop)
        epp = EppProcess([fake.address])
        await epp.start()
        cleanup.push_async_callback(epp.stop)
        gateway = EnvoyGateway("epp", epp_grpc_port=epp.grpc_port)
        mode = processing_mode(gateway.config)
        mode["request_body_mode"], mode["response_body_mode"] = request_mode, response_mode
        await gateway.start()
        cleanup.push_async_callback(gateway.stop)
        session = await cleanup.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        )
        body = orjson.dumps({"model": "m", "prompt": "hello"})
        async with session.post(
            gateway.url + "/v1/completions", data=body, headers={"content-type": "application/json"}
        ) as resp:
            text = await resp.read()
            assert resp.status == 500, f"{resp.status} {text!r}\n{gateway.log_tail()}\n{epp.log_tail()}"
        assert named in text and b"FULL_DUPLEX_STREAMED" in text
        assert fake.received == []  # nothing reached the model server
