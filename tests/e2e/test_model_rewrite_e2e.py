"""InferenceModelRewrite end to end: a real Envoy, epp (`python -m epp` with
`--inference-model-rewrites-file`) and a fake vLLM. The model server receives the target model
(a well-formed body), and the client gets an intact response naming the
model it asked for, JSON and streamed.

Not skippable: without the Envoy binary the tests fail and say to run `make tools`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio

from epp_bench.gateway import EnvoyGateway, EppProcess
from tests.support.fake_vllm import FakeVllm
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(30)]

REWRITES = """
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: alias}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {value: food-review}}]
    targets: [{modelRewrite: food-review-lora-v1}]
"""


@dataclass
class Stack:
    fake: FakeVllm
    epp: EppProcess
    gateway: EnvoyGateway
    session: aiohttp.ClientSession

    def diagnostics(self) -> str:
        return f"--- envoy log ---\n{self.gateway.log_tail()}\n--- epp log ---\n{self.epp.log_tail()}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    require_envoy()
    rewrites: Path = tmp_path_factory.mktemp("rewrites") / "rewrites.yaml"
    rewrites.write_text(REWRITES)
    async with AsyncExitStack() as cleanup:
        fake = await FakeVllm("a").start()
        cleanup.push_async_callback(fake.stop)
        epp = EppProcess([fake.address], extra_args=["--inference-model-rewrites-file", str(rewrites)])
        gateway, session = await epp_behind_envoy(cleanup, epp, timeout_s=10)
        yield Stack(fake, epp, gateway, session)


async def test_the_model_server_gets_the_target_and_the_client_its_own_name(stack: Stack) -> None:
    stack.fake.received.clear()
    payload = {"model": "food-review", "prompt": "Say hello", "max_tokens": 5}
    async with stack.session.post(stack.gateway.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 200, stack.diagnostics()
        answer = await resp.read()
        declared = resp.headers.get("Content-Length")  # Envoy drops it for a streamed-mode body
    assert declared is None or int(declared) == len(answer)
    (received,) = stack.fake.received
    assert received["body"] == {**payload, "model": "food-review-lora-v1"}
    reply = orjson.loads(answer)  # whole: the client read exactly the body it was told of
    assert reply["model"] == "food-review"
    assert reply["choices"][0]["text"] == "abc"


async def test_a_streamed_answer_arrives_whole(stack: Stack) -> None:
    stack.fake.received.clear()
    payload = {"model": "food-review", "prompt": "Say hello", "stream": True}
    async with stack.session.post(stack.gateway.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 200, stack.diagnostics()
        text = (await resp.read()).decode()
    assert stack.fake.received[0]["body"]["model"] == "food-review-lora-v1"
    assert text.count("data: ") == 5 and text.endswith("data: [DONE]\n\n")
