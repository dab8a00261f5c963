"""`--endpoint-selector` in full Kubernetes label-selector syntax, as the Go EPP parses it
(apimachinery's labels.Parse): parsing, errors, matching, and discovery against the loopback API
server, which evaluates the selector on its side with its own, separately written parser."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from epp.discovery.kubernetes import pod_endpoints, pod_view
from epp.discovery.pool import PoolSpec, parse_pool, parse_ports_flag, parse_selector_flag
from epp.discovery.selector import Selector, SelectorError
from epp.errors import PoolSpecError
from epp.settings import parse_settings
from tests.support.epp_app import wait_until
from tests.support.kube_api import (
    LEASES,
    PODS,
    KubeApiServer,
    endpoint_keys,
    endpoint_view,
    inference_pool,
    parse_label_selector,
    pod,
    running_k8s_epp,
    wait_for_health,
)


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer(resources=[PODS, LEASES]).start()  # no InferencePool CRD
    yield server
    await server.stop()


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("app=vllm", "app=vllm"),
        ("app==vllm", "app==vllm"),
        ("app!=vllm", "app!=vllm"),
        ("app=vllm,tier=gpu", "app=vllm,tier=gpu"),
        ("tier=gpu,app=vllm", "app=vllm,tier=gpu"),  # sorted by key, as Go's String()
        (" app = vllm , tier = gpu ", "app=vllm,tier=gpu"),  # blanks around tokens
        ("app in (vllm)", "app in (vllm)"),
        ("app in (vllm, sglang)", "app in (sglang,vllm)"),  # values sorted
        ("app in (vllm,vllm)", "app in (vllm)"),
        ("app notin (a,b)", "app notin (a,b)"),
        ("app in(vllm)", "app in (vllm)"),
        ("gpu", "gpu"),
        ("!canary", "!canary"),
        ("! canary", "!canary"),
        ("app in (vllm),tier!=canary", "app in (vllm),tier!=canary"),
        ("tier notin (cpu),!canary,app", "app,!canary,tier notin (cpu)"),  # by key, not operator
        ("replicas>2", "replicas>2"),
        ("replicas<10", "replicas<10"),
        ("app=", "app="),  # the empty value
        ("app in ()", "app in ()"),
        ("app in (a,,b)", "app in (,a,b)"),
        ("in in (in,notin)", "in in (in,notin)"),  # keywords are words where a word is expected
        ("llm-d.ai/role=decode", "llm-d.ai/role=decode"),
        ("app.kubernetes.io/name in (vllm-llama3-8b)", "app.kubernetes.io/name in (vllm-llama3-8b)"),
    ],
)
def test_valid_selectors_parse_to_the_canonical_query(text: str, canonical: str) -> None:
    selector = parse_selector_flag(text)
    assert selector.to_query() == canonical
    assert Selector.parse(canonical) == selector  # the canonical form reads back the same


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app=vllm,", "found '', expected: identifier after ','"),
        ("app=vllm,,tier=gpu", "found ',', expected: identifier after ','"),
        ("=vllm", "found '=', expected: !, identifier, or 'end of string'"),
        ("app vllm", "unable to parse requirement: found 'vllm', expected: in, notin, =, ==, !=, gt, lt"),
        ("app in vllm", "unable to parse requirement: found 'vllm' expected: '('"),
        ("app in (vllm", "unable to parse requirement: found '', expected: ',' or ')'"),
        ("app in (vllm sglang)", "found 'sglang', expected: ',' or ')'"),
        ("app notin (=)", "found '=', expected: ',', ')' or identifier"),
        ("app=vllm=x", "found '=', expected: ',' or 'end of string'"),
        ("!app=vllm", "found '=', expected: ',' or 'end of string'"),
        ("app in (a))", "found ')', expected: ',' or 'end of string'"),
        ("!", "unable to parse requirement: found '', expected: identifier"),
        ("_bad!=x", 'invalid label key "_bad": name part must consist of alphanumeric'),
        ("a/b/c=x", 'invalid label key "a/b/c": a qualified name must consist'),
        ("Example.com/x=y", 'invalid label key "Example.com/x": prefix part a lowercase RFC 1123 subdomain'),
        ("app=-vllm", 'invalid value "-vllm" for label "app": a valid label must be an empty string'),
        ("app=" + "v" * 64, "must be no more than 63 bytes"),
        ("replicas>two", "for 'Gt', 'Lt' operators, the value must be an integer"),
        ("   ", "no requirement given"),
    ],
)
def test_invalid_selectors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse_selector_flag(text)
    assert str(err.value).startswith(f'invalid endpoint-selector "{text}": ')
    assert message in str(err.value)
    assert isinstance(err.value, PoolSpecError)


def test_a_bad_selector_flag_exits_with_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "epp",
            "--endpoint-selector",
            "app in (vllm",
            "--endpoint-target-ports",
            "8000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'epp: error: invalid endpoint-selector "app in (vllm": unable to parse requirement: '
        "found '', expected: ',' or ')'"
    ]


def test_selector_in_settings_and_an_empty_flag_is_no_selector() -> None:
    s = parse_settings(["--endpoint-selector=app in (vllm),tier!=canary", "--endpoint-target-ports=8000"])
    assert s.endpoint_selector == Selector.parse("tier!=canary,app in (vllm)")
    assert str(s.endpoint_selector) == "app in (vllm),tier!=canary"
    assert s.uses_kubernetes
    # As in Go, `--endpoint-selector ""` is no selector: the other mode decides.
    none = parse_settings(["--endpoint-selector=", "--endpoints", "127.0.0.1:8000"])
    assert none.endpoint_selector is None and not none.uses_kubernetes


# -- matching ----------------------------------------------------------------------------------------

LABEL_SETS: list[dict[str, str]] = [
    {},
    {"app": "vllm"},
    {"app": "vllm", "tier": "canary"},
    {"app": "vllm", "tier": "stable"},
    {"app": "sglang"},
    {"app": "sglang", "tier": "canary", "replicas": "3"},
    {"app": "", "replicas": "12"},
    {"replicas": "x"},
]


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        ("app=vllm", [1, 2, 3]),
        ("app!=vllm", [0, 4, 5, 6, 7]),  # != also selects what lacks the label
        ("app in (vllm,sglang)", [1, 2, 3, 4, 5]),
        ("app notin (vllm)", [0, 4, 5, 6, 7]),  # and so does notin
        ("app", [1, 2, 3, 4, 5, 6]),
        ("!app", [0, 7]),
        ("!tier", [0, 1, 4, 6, 7]),
        ("app in (vllm),tier!=canary", [1, 3]),
        ("app=", [6]),
        ("app in ()", [6]),
        ("replicas>2", [5, 6]),
        ("replicas<4", [5]),  # a label that is not an integer never compares
        ("app,tier,!replicas", [2, 3]),
    ],
)
def test_matching_is_the_api_servers(text: str, selected: list[int]) -> None:
    selector = Selector.parse(text)
    assert [i for i, labels in enumerate(LABEL_SETS) if selector.matches(labels)] == selected
    # The loopback API server's separately written evaluator agrees, on the text and on the query.
    for query in (text, selector.to_query()):
        server = parse_label_selector(query)
        assert [
            i for i, labels in enumerate(LABEL_SETS) if server({"metadata": {"labels": labels}})
        ] == selected


def test_every_combination_agrees_with_the_loopback_api_server() -> None:
    terms = [
        "app=vllm",
        "app!=vllm",
        "app in (vllm,sglang)",
        "tier notin (canary)",
        "tier",
        "!replicas",
        "replicas>2",
    ]
    for n in (1, 2, 3):
        for combo in itertools.combinations(terms, n):
            selector = Selector.parse(",".join(combo))
            server = parse_label_selector(selector.to_query())
            for labels in LABEL_SETS:
                assert selector.matches(labels) == server({"metadata": {"labels": labels}}), (combo, labels)


def test_pool_match_labels_become_a_selector() -> None:
    spec = parse_pool(inference_pool("p", {"app": "vllm", "llm-d.ai/role": "decode"}, [8000]))
    assert spec.selector == Selector.from_labels({"llm-d.ai/role": "decode", "app": "vllm"})
    assert spec.label_selector() == "app=vllm,llm-d.ai/role=decode"
    assert spec == PoolSpec({"app": "vllm", "llm-d.ai/role": "decode"}, (8000,))  # a map is accepted too
    with pytest.raises(
        PoolSpecError, match=r"InferencePool default/p: selector: invalid label key \"bad key\""
    ):
        parse_pool(inference_pool("p", {"bad key": "x"}, [8000]))
    # A set-based selector picks pods by the same rules in discovery.
    pool = PoolSpec(Selector.parse("app in (vllm),tier!=canary"), (8000,))
    assert [e.name for e in pod_endpoints(pool, pod_view(pod("a", "10.0.0.1", {"app": "vllm"})))] == ["a"]
    canary = pod_view(pod("b", "10.0.0.2", {"app": "vllm", "tier": "canary"}))
    assert pod_endpoints(pool, canary) == []


def test_target_ports_duplicates_are_removed_as_go_does() -> None:
    assert parse_ports_flag("8000,8001,8000") == (8000, 8001)
    assert parse_ports_flag("8001, 8000 ,8001,8001") == (8001, 8000)  # first occurrence first
    # Duplicates are dropped before the 1-8 check, as removeDuplicatePorts runs before Validate.
    assert len(parse_ports_flag("1,2,3,4,5,6,7,8,8,1")) == 8
    with pytest.raises(PoolSpecError, match="1-8"):
        parse_ports_flag("1,2,3,4,5,6,7,8,9")
    s = parse_settings(["--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000,8000"])
    assert s.endpoint_target_ports == (8000,)


# -- discovery against the loopback API server ------------------------------------------------------


async def test_set_based_selector_picks_the_right_pods(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
    api.put(PODS, pod("b", "127.0.1.2", {"app": "vllm", "tier": "canary"}))
    api.put(PODS, pod("c", "127.0.1.3", {"app": "sglang"}))
    api.put(PODS, pod("d", "127.0.1.4", {"app": "vllm", "tier": "stable"}))
    flags = ("--endpoint-selector", "app in (vllm),tier!=canary", "--endpoint-target-ports", "8000")
    async with running_k8s_epp(kubeconfig, *flags) as epp:
        await wait_for_health(epp, "SERVING")
        assert endpoint_view(epp) == {"127.0.1.1:8000": "a", "127.0.1.4:8000": "d"}
        # The API server applies the selector, in its canonical form.
        assert {r.query.get("labelSelector") for r in api.lists(PODS)} == {"app in (vllm),tier!=canary"}
        # A relabel moves a pod across the selector: the server's watch drops or adds it.
        api.put(PODS, pod("a", "127.0.1.1", {"app": "vllm", "tier": "canary"}))
        api.put(PODS, pod("b", "127.0.1.2", {"app": "vllm", "tier": "stable"}))
        await wait_until(
            lambda: endpoint_keys(epp) == {"127.0.1.2:8000", "127.0.1.4:8000"}, what="relabelled pods"
        )
        api.put(PODS, pod("c", "127.0.1.3", {"app": "vllm"}))
        await wait_until(lambda: "127.0.1.3:8000" in endpoint_keys(epp), what="c selected")
        assert len(api.lists(PODS)) == 1  # all of it from one list and its watch


async def test_the_charts_standalone_form(
    api: KubeApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routerlib chart without an InferencePool: `--endpoint-selector "k=v,..."
    --endpoint-target-ports "8000,..."`, no --pool-namespace (NAMESPACE from the Downward API),
    POD_NAME set, and with several replicas `--ha-enable-leader-election`."""
    monkeypatch.setenv("NAMESPACE", "llm")
    monkeypatch.setenv("POD_NAME", "router-epp-7d9f8b6c5d-x2k4q")
    api.put(PODS, pod("a", "127.0.1.1", {"app": "vllm", "llm-d.ai/model": "qwen"}, namespace="llm"))
    api.put(PODS, pod("b", "127.0.1.2", {"app": "vllm"}, namespace="llm"))  # one label short
    api.put(PODS, pod("z", "127.0.1.9", {"app": "vllm", "llm-d.ai/model": "qwen"}))  # other namespace
    chart_args = (
        "--endpoint-selector",
        "app=vllm,llm-d.ai/model=qwen",
        "--endpoint-target-ports",
        "8000,8001",
        "--zap-encoder",
        "json",
        "--tracing=false",
        "--metrics-endpoint-auth=false",
        "--ha-enable-leader-election",
        "--ha-retry-period",
        "100ms",
    )
    async with running_k8s_epp(kubeconfig, *chart_args) as epp:
        assert epp.app.settings.pool_namespace == "llm"
        await wait_for_health(epp, "SERVING")
        assert endpoint_view(epp) == {"127.0.1.1:8000": "a:8000", "127.0.1.1:8001": "a:8001"}
        assert {r.path for r in api.lists(PODS)} == {"/api/v1/namespaces/llm/pods"}
        # The Lease is held under the pod's name, as client-go writes it (<pod>_<uuid>).
        leader = epp.app.leader
        assert leader is not None and leader.identity.startswith("router-epp-7d9f8b6c5d-x2k4q_")
        lease = api.get(LEASES, leader.name, namespace="llm")
        assert lease is not None and lease["spec"]["holderIdentity"] == leader.identity
