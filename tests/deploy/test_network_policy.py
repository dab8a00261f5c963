"""components/network-policy, checked offline: rendered onto every gateway x model-server
combination (GKE with ./gke), validated against the Kubernetes schemas, and then asked what an
operator wants to know: which connections it lets through. A small evaluator of NetworkPolicy
semantics (pod and namespace selectors, ipBlocks, ports; the Kubernetes rules: a pod selected by
a policy of a type is isolated for that type, rules add up) answers for concrete pods and
addresses: the Gateway's proxies (labelled as kgateway and Istio label them, after the Gateway in
the same render), Prometheus in `monitoring`, a model-server pod, any other pod, the outside.
The patches deploy/README.md gives for its parameters are applied and checked the same way.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.test_deploy import GATEWAYS, MODEL_SERVERS
from tests.support.kustomize_render import (
    OVERLAYS,
    REPO,
    Obj,
    container_port,
    envoyfilter_replacements,
    of_kind,
    one,
    pod_templates,
    render,
    render_many,
    write_overlay,
)
from tests.support.kustomize_validate import KUBERNETES_VERSIONS, validate_core

NAMESPACE = "llm"
GKE_PROXY_SUBNET = "10.129.0.0/23"  # the component's default (Google's example range)
GOOGLE_HEALTH_CHECKERS = ("35.191.0.0/16", "130.211.0.0/22")
API_SERVER = "172.18.0.2"  # an API server endpoint, as kind has it (port 6443)
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


# --- a NetworkPolicy evaluator -------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ip: str = "10.244.1.9"
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


Peer = Pod | str  # a pod, or an address outside the cluster


def _selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions; {} selects everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _in_block(block: Obj, ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(block["cidr"])
    if address.version != net.version or address not in net:
        return False
    return not any(
        address in ipaddress.ip_network(e)
        for e in block.get("except") or []
        if ipaddress.ip_network(e).version == address.version
    )


def _peer_matches(peer_rule: Obj, policy_ns: str, peer: Peer) -> bool:
    if "ipBlock" in peer_rule:
        return _in_block(peer_rule["ipBlock"], peer if isinstance(peer, str) else peer.ip)
    if isinstance(peer, str):
        return False  # pod and namespace selectors name pods only
    if "namespaceSelector" in peer_rule:
        if not _selects(peer_rule["namespaceSelector"], peer.ns_labels()):
            return False
        return _selects(peer_rule.get("podSelector", {}), peer.labels)
    return peer.namespace == policy_ns and _selects(peer_rule["podSelector"], peer.labels)


def _port_matches(rule_ports: list[Obj] | None, port: int, protocol: str, pod_template: Obj | None) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        named_or_number: int | str = p["port"]
        number: int | None = None
        if isinstance(named_or_number, str):  # a named port, resolved on the pod it applies to
            if pod_template is not None:
                number = container_port(pod_template, named_or_number)
        else:
            number = named_or_number
        if number is None:
            continue
        end: int = p.get("endPort", number)
        if number <= port <= end:
            return True
    return False


def _allowed(
    policies: list[Obj],
    direction: str,
    target: Pod,
    template: Obj | None,
    peer: Peer,
    port: int,
    protocol: str,
) -> bool:
    """Whether `peer` may connect to `target`:port (direction Ingress), or `target` to `peer`:port
    (Egress; `template` is then the peer's pod template, for named ports)."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applying = [
        p
        for p in policies
        if p["metadata"].get("namespace", NAMESPACE) == target.namespace
        and _selects(p["spec"]["podSelector"], target.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True  # not isolated
    for policy in applying:
        ns = policy["metadata"].get("namespace", NAMESPACE)
        for rule in policy["spec"].get(key) or []:
            if not _port_matches(rule.get("ports"), port, protocol, template):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_matches(r, ns, peer) for r in peers):
                return True
    return False


# --- the stack a render describes ----------------------------------------------------------------


@dataclass
class Stack:
    objs: list[Obj]
    policies: list[Obj]
    epp: Pod
    epp_template: Obj
    model_pods: list[tuple[Pod, Obj]]
    pool_ports: list[int]
    gateway_name: str

    def port(self, name: str) -> int:
        number = container_port(self.epp_template, name)
        assert number is not None, name
        return number

    def into_epp(self, peer: Peer, port: int, protocol: str = "TCP") -> bool:
        return _allowed(self.policies, "Ingress", self.epp, self.epp_template, peer, port, protocol)

    def out_of_epp(self, peer: Peer, port: int, protocol: str = "TCP", template: Obj | None = None) -> bool:
        return _allowed(self.policies, "Egress", self.epp, template, peer, port, protocol)


def stack(objs: list[Obj]) -> Stack:
    deployment = one(objs, "Deployment", "epp")
    template = deployment["spec"]["template"]
    epp = Pod(deployment["metadata"]["namespace"], dict(template["metadata"]["labels"]), ip="10.244.0.7")
    models = [
        (Pod(w["metadata"]["namespace"], dict(t["metadata"]["labels"]), ip="10.244.2.3"), t)
        for w, t in pod_templates(objs)
        if w["metadata"]["name"] != "epp"
    ]
    pool = one(objs, "InferencePool")
    return Stack(
        objs=objs,
        policies=of_kind(objs, "NetworkPolicy"),
        epp=epp,
        epp_template=template,
        model_pods=models,
        pool_ports=[p["number"] for p in pool["spec"]["targetPorts"]],
        gateway_name=one(objs, "Gateway")["metadata"]["name"],
    )


def gateway_proxy(s: Stack, gateway: str) -> Peer:
    """A pod of the Gateway's proxy as its controller labels it, or GKE's proxy-only subnet."""
    if gateway == "gateway-gke":
        return "10.129.0.17"
    labels = {GATEWAY_NAME_LABEL: s.gateway_name}
    if gateway.startswith("gateway-istio"):
        labels |= {
            "istio.io/gateway-name": s.gateway_name,
            "gateway.istio.io/managed": "istio.io-gateway-controller",
        }
    else:
        labels |= {"app.kubernetes.io/name": s.gateway_name, "app.kubernetes.io/instance": s.gateway_name}
    return Pod(NAMESPACE, labels, ip="10.244.3.4")


PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"}, ip="10.244.4.5")
SOME_POD = Pod(NAMESPACE, {"app": "curl"}, ip="10.244.5.6")
SOME_POD_ELSEWHERE = Pod("default", {"app": "curl"}, ip="10.244.5.7")
# A pod in another namespace wearing a gateway's label: not the Gateway's proxy.
IMPOSTOR = Pod("default", {GATEWAY_NAME_LABEL: "inference-gateway"}, ip="10.244.5.8")
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"}, ip="10.244.0.2")
OUTSIDE = "203.0.113.7"


def _components(gateway: str, model: str, *extras: str) -> list[str]:
    policy = ["network-policy", *(["network-policy/gke"] if gateway == "gateway-gke" else [])]
    return ["namespace", gateway, model, *extras, *policy]


COMBINATIONS = [(g, m, ()) for g in GATEWAYS for m in MODEL_SERVERS] + [
    ("gateway-kgateway", "model-vllm-gpu", ("ha", "monitoring")),
    ("gateway-istio", "model-sim-cpu", ("ha", "plaintext")),
    ("gateway-gke", "model-vllm-gpu", ("tls-secret",)),
]


def _extra(gateway: str) -> str:
    return envoyfilter_replacements() if gateway == "gateway-istio-envoyfilter" else ""


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, tuple[str, ...]], list[Obj]]:
    root = tmp_path_factory.mktemp("netpol")
    return render_many(
        {
            (gateway, model, extras): write_overlay(
                root / "_".join([gateway, model, *extras]),
                _components(gateway, model, *extras),
                extra=_extra(gateway),
            )
            for gateway, model, extras in COMBINATIONS
        }
    )


def _ids(combo: tuple[str, str, tuple[str, ...]]) -> str:
    return "+".join([combo[0], combo[1], *combo[2]])


# --- the tests -----------------------------------------------------------------------------------


def test_the_policy_validates_strictly_in_every_combination(
    renders: dict[tuple[str, str, tuple[str, ...]], list[Obj]],
) -> None:
    overlay = render(OVERLAYS / "kgateway-sim-network-policy")
    failures = []
    for where, objs in [*((_ids(k), v) for k, v in renders.items()), ("overlay", overlay)]:
        policies = of_kind(objs, "NetworkPolicy")
        assert len(policies) == 1, where
        assert policies[0]["metadata"]["namespace"] == NAMESPACE, where
        for version in KUBERNETES_VERSIONS:
            failures += [f"{where} ({version}): {e}" for e in validate_core(policies[0], version)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_ingress_admits_the_gateway_to_ext_proc_and_prometheus_to_metrics_only(
    combo: tuple[str, str, tuple[str, ...]], renders: dict[tuple[str, str, tuple[str, ...]], list[Obj]]
) -> None:
    gateway = combo[0]
    s = stack(renders[combo])
    ext_proc, health, metrics = s.port("grpc"), s.port("grpc-health"), s.port("metrics")
    service = one(s.objs, "Service", "epp")
    assert {container_port(s.epp_template, p["targetPort"]) for p in service["spec"]["ports"]} == {
        ext_proc,
        metrics,
    }
    proxy = gateway_proxy(s, gateway)

    assert s.into_epp(proxy, ext_proc), "the gateway's proxies reach ext_proc"
    assert not s.into_epp(proxy, metrics)
    assert s.into_epp(PROMETHEUS, metrics), "Prometheus scrapes /metrics"
    assert not s.into_epp(PROMETHEUS, ext_proc) and not s.into_epp(PROMETHEUS, health)
    strangers: list[Peer] = [
        SOME_POD,
        SOME_POD_ELSEWHERE,
        IMPOSTOR,
        OUTSIDE,
        *(pod for pod, _ in s.model_pods),
    ]
    for stranger in strangers:
        for port in (ext_proc, metrics, health, 8000):
            assert not s.into_epp(stranger, port), f"{stranger} reaches epp:{port}"
    if gateway == "gateway-gke":
        # The load balancer health-checks epp on 9003, from its proxies and Google's checkers.
        assert s.into_epp(proxy, health)
        for block in GOOGLE_HEALTH_CHECKERS:
            checker = str(next(ipaddress.ip_network(block).hosts()))
            assert s.into_epp(checker, health) and not s.into_epp(checker, ext_proc)
    else:
        assert not s.into_epp(proxy, health)
        # The label is the Gateway's name: the Istio EnvoyFilter targets the same proxies.
        envoyfilter = next(iter(of_kind(s.objs, "EnvoyFilter")), None)
        if envoyfilter is not None:
            assert envoyfilter["spec"]["workloadSelector"]["labels"] == {
                "istio.io/gateway-name": s.gateway_name
            }


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_egress_reaches_the_model_servers_the_api_server_and_dns_only(
    combo: tuple[str, str, tuple[str, ...]], renders: dict[tuple[str, str, tuple[str, ...]], list[Obj]]
) -> None:
    s = stack(renders[combo])
    assert s.model_pods
    for pod, template in s.model_pods:
        for port in s.pool_ports:
            assert s.out_of_epp(pod, port, template=template), f"epp scrapes {pod.labels} on {port}"
        for port in (8200, 5600, 22):  # vLLM behind the P/D sidecar, NIXL, anything else
            assert not s.out_of_epp(pod, port, template=template)
    for protocol in ("UDP", "TCP"):
        assert s.out_of_epp(KUBE_DNS, 53, protocol)
    assert not s.out_of_epp(KUBE_DNS, 8080)
    assert s.out_of_epp(API_SERVER, 6443) and s.out_of_epp("10.96.0.1", 443)
    assert s.out_of_epp("fd00::1", 443)
    assert not s.out_of_epp(API_SERVER, 80) and not s.out_of_epp(OUTSIDE, 8000)
    assert not s.out_of_epp(SOME_POD, 8000) and not s.out_of_epp(SOME_POD, 53, "UDP")
    assert not s.out_of_epp(Pod("other", {"k8s-app": "kube-dns"}), 53, "UDP")  # not the cluster's DNS


def test_the_policy_selects_epp_and_nothing_else(
    renders: dict[tuple[str, str, tuple[str, ...]], list[Obj]],
) -> None:
    for key, objs in renders.items():
        s = stack(objs)
        (policy,) = s.policies
        assert _selects(policy["spec"]["podSelector"], s.epp.labels), _ids(key)
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        for pod, _ in s.model_pods:
            assert not _selects(policy["spec"]["podSelector"], pod.labels), _ids(key)
        # No rule opens a port to everyone, or everything to someone.
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from") and rule.get("ports"), rule


# --- the parameters: the patches deploy/README.md gives ------------------------------------------


def readme_patch(marker: str) -> str:
    """The fenced YAML block that follows `<!-- marker -->` in deploy/README.md."""
    guide = (REPO / "deploy" / "README.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```yaml\n(.*?)```", guide, re.S)
    assert found, f"deploy/README.md has no {marker} block"
    return found.group(1)


def test_the_documented_patch_moves_the_gateway_prometheus_and_api_server(tmp_path: Path) -> None:
    patch = readme_patch("network-policy-patch")
    objs = render(write_overlay(tmp_path, _components("gateway-kgateway", "model-sim-cpu"), extra=patch))
    (policy,) = of_kind(objs, "NetworkPolicy")
    for version in KUBERNETES_VERSIONS:
        assert not validate_core(policy, version)
    s = stack(objs)
    ext_proc, metrics = s.port("grpc"), s.port("metrics")
    moved_gateway = Pod("gateways", {GATEWAY_NAME_LABEL: "shared-gateway"})
    assert s.into_epp(moved_gateway, ext_proc)
    assert not s.into_epp(gateway_proxy(s, "gateway-kgateway"), ext_proc)  # the old peer is gone
    assert not s.into_epp(Pod("default", {GATEWAY_NAME_LABEL: "shared-gateway"}), ext_proc)
    assert s.into_epp(Pod("observability", {"app": "prometheus"}), metrics)
    assert not s.into_epp(PROMETHEUS, metrics)
    assert s.out_of_epp("10.0.0.1", 443) and not s.out_of_epp(API_SERVER, 6443)
    assert not s.out_of_epp("198.51.100.1", 443)


def test_the_documented_gke_patch_sets_the_proxy_only_subnet(tmp_path: Path) -> None:
    patch = readme_patch("network-policy-gke-patch")
    objs = render(write_overlay(tmp_path, _components("gateway-gke", "model-vllm-gpu"), extra=patch))
    (policy,) = of_kind(objs, "NetworkPolicy")
    for version in KUBERNETES_VERSIONS:
        assert not validate_core(policy, version)
    s = stack(objs)
    assert s.into_epp("10.200.0.9", s.port("grpc")) and s.into_epp("10.200.0.9", s.port("grpc-health"))
    assert not s.into_epp("10.129.0.17", s.port("grpc")), "the example range is replaced"
    ranges = {
        peer["ipBlock"]["cidr"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "ipBlock" in peer
    }
    assert GKE_PROXY_SUBNET not in ranges


def test_the_evaluator_follows_the_kubernetes_rules() -> None:
    """The evaluator itself, on the cases the NetworkPolicy documentation spells out."""
    deny_all: Obj = {"metadata": {"namespace": "a"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    target = Pod("a", {"app": "x"})
    assert _allowed([], "Ingress", target, None, OUTSIDE, 80, "TCP")  # not isolated
    assert not _allowed([deny_all], "Ingress", target, None, SOME_POD, 80, "TCP")
    assert _allowed([deny_all], "Egress", target, None, SOME_POD, 80, "TCP")  # isolated for ingress only
    both: Obj = {
        "metadata": {"namespace": "a"},
        "spec": {
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "t"}}, "podSelector": {}}]},
                {
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                    "ports": [{"port": 80}],
                },
            ],
        },
    }
    assert _allowed(
        [deny_all, both], "Ingress", target, None, Pod("b", {}, namespace_labels={"team": "t"}), 1, "TCP"
    )
    assert not _allowed([both], "Ingress", target, None, Pod("b", {}), 1, "TCP")
    assert _allowed([both], "Ingress", target, None, "10.2.3.4", 80, "TCP")
    assert not _allowed([both], "Ingress", target, None, "10.1.3.4", 80, "TCP")
    assert not _allowed([both], "Ingress", target, None, "10.2.3.4", 80, "UDP")
    assert not _allowed([both], "Ingress", target, None, "10.2.3.4", 81, "TCP")
