"""A response slow to start, through a real Envoy: a non-streamed generation sends nothing until
it is whole, which can take minutes. epp's `--extproc-stream-idle-timeout` is for requests that
stop arriving; once a request is routed its stream waits as long as the gateway does, so the
client gets its answer rather than the 500 Envoy makes of an ext_proc stream ended under it.

Not skippable: without the Envoy binary the test fails and says to run `make tools`.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import orjson
import pytest

from epp_bench.gateway import EppProcess
from tests.support.fake_vllm import SERVED_BY, FakeVllm
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = pytest.mark.timeout(60)


async def test_a_response_slower_to_start_than_the_idle_timeout_reaches_the_client() -> None:
    require_envoy()
    async with AsyncExitStack() as cleanup:
        fake = await FakeVllm("a", response_delay_s=2.5).start()
        cleanup.push_async_callback(fake.stop)
        epp = EppProcess([fake.address], extra_args=["--extproc-stream-idle-timeout", "1s"])
        gateway, session = await epp_behind_envoy(cleanup, epp, timeout_s=20)
        body = orjson.dumps({"model": "m", "prompt": "a long generation"})
        url = gateway.url + "/v1/completions"
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            text = await resp.text()
            assert resp.status == 200, f"{resp.status} {text}\n{gateway.log_tail()}\n{epp.log_tail()}"
            assert resp.headers[SERVED_BY] == "a"
        assert orjson.loads(text)["choices"][0]["text"] == "abc"
