"""deploy/ (kustomize) and the Dockerfile, checked offline.

Every overlay, and every combination of gateway x model-server component (with the optional
components), renders with the real kustomize (kubectl's); core kinds validate against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict); custom resources validate against the
upstream CRDs in ../shared/crds (schema, strict, and their CEL rules); the epp config passes
`epp --check-config`; epp's and the simulator's arguments parse with their real parsers; epp's
container runs the upstream chart's argument vector and probes (tests/deploy/chart.py) plus only
the documented additions of components/plaintext and components/tls-secret; names, labels and
ports agree across objects; no container runs as root; Roles grant no writes beyond the HA Lease.
Last, the data path the manifests describe runs for real: Envoy configured from the EnvoyFilter
(with the DestinationRule's TLS), epp with the Deployment's flags (TLS with its own self-signed
certificate), and a simulator pod's arguments. tests/deploy/test_chart_args.py runs epp with the
chart's vector against the loopback Kubernetes API server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp.discovery.objectives import OBJECTIVE_GROUP, OBJECTIVE_PLURAL
from epp.discovery.pool_objects import DEFAULT_POOL_GROUP
from epp.discovery.rewrites import REWRITE_GROUP, REWRITE_PLURAL
from tests.deploy.chart import (
    CHART_ARGS,
    HA_FLAG,
    UPSTREAM_README,
    chart_args,
    chart_probes,
    readme_chart_args,
)
from tests.support.kustomize_render import (
    BASE,
    COMPONENTS,
    DEPLOY,
    OVERLAYS,
    REPO,
    Obj,
    component_dirs,
    container_port,
    containers,
    envoyfilter_replacements,
    maybe,
    of_kind,
    one,
    overlay_dirs,
    pod_templates,
    render,
    render_many,
    selects,
    write_overlay,
)
from tests.support.kustomize_validate import (
    KUBERNETES_VERSIONS,
    CrdCatalog,
    crd_dir,
    is_core,
    validate_core,
)

GATEWAYS = ("gateway-kgateway", "gateway-istio", "gateway-istio-envoyfilter", "gateway-gke")
MODEL_SERVERS = ("model-vllm-gpu", "model-sim-cpu", "model-pd-vllm-gpu")
# Gateways that always dial the endpoint picker over TLS (kgateway hard-codes it; GKE follows the
# InferencePool API's "TLS by default"): never combined with components/plaintext.
TLS_ONLY_GATEWAYS = ("gateway-kgateway", "gateway-gke")
# Custom resources with no upstream CRD in ../shared/crds: checked by hand below instead.
NO_CRD_KINDS = {("networking.gke.io/v1", "HealthCheckPolicy"), ("networking.gke.io/v1", "GCPBackendPolicy")}
READ_VERBS = {"get", "list", "watch"}
EPP_IMAGE = "epp:dev"
# What a component appends to the chart's argument vector (deploy/README.md says why), and nothing
# else does.
ARG_ADDITIONS = {
    "plaintext": ["--secure-serving=false"],
    "tls-secret": ["--cert-path=/certs", "--enable-cert-reload"],
}


def _combination_components(gateway: str, model: str, extras: tuple[str, ...]) -> list[str]:
    # Order matters: plaintext patches the gateway's DestinationRule, so it comes after it.
    return ["namespace", gateway, model, *extras]


def _combinations() -> list[tuple[str, str, tuple[str, ...]]]:
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for gateway, model in itertools.product(GATEWAYS, MODEL_SERVERS):
        out.append((gateway, model, ()))
        out.append((gateway, model, ("monitoring", "ha")))
        out.append((gateway, model, ("tls-secret",)))
        if gateway not in TLS_ONLY_GATEWAYS:
            out.append((gateway, model, ("ha", "plaintext")))
    return out


COMBINATIONS = _combinations()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[Obj]]:
    dirs = overlay_dirs()
    assert dirs, "deploy/overlays has no overlay"
    return render_many({d.name: d for d in dirs})


@pytest.fixture(scope="module")
def combinations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    root = tmp_path_factory.mktemp("kustomize")
    workdirs = {}
    for gateway, model, extras in COMBINATIONS:
        name = "+".join([gateway, model, *extras])
        extra = envoyfilter_replacements() if gateway == "gateway-istio-envoyfilter" else ""
        workdirs[name] = write_overlay(
            root / name.replace("+", "_"), _combination_components(gateway, model, extras), extra=extra
        )
    return render_many(workdirs)


@pytest.fixture(scope="module")
def every_render(overlays: dict[str, list[Obj]], combinations: dict[str, list[Obj]]) -> dict[str, list[Obj]]:
    return {**{f"overlays/{k}": v for k, v in overlays.items()}, **combinations}


@pytest.fixture(scope="module")
def catalog() -> CrdCatalog:
    return CrdCatalog()


def _unique_objects(renders: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    seen: set[str] = set()
    for where, objs in renders.items():
        for obj in objs:
            key = json.dumps(obj, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield where, obj


# --- rendering ---------------------------------------------------------------------------------


def test_the_crds_are_read_from_shared_beside_the_repo() -> None:
    directory = crd_dir()  # fails, with the reason, when ../shared/crds is missing
    assert directory == REPO.parent / "shared" / "crds"
    copied = [
        p for p in [*DEPLOY.rglob("*.yaml"), *(REPO / "tests").rglob("*.yaml")]
        if "kind: CustomResourceDefinition" in p.read_text(errors="ignore")
    ]  # fmt: skip
    assert not copied, f"CRDs must be read from {directory}, not copied into the repository: {copied}"


@pytest.mark.parametrize("overlay", [d.name for d in overlay_dirs()])
def test_every_overlay_renders(overlay: str, overlays: dict[str, list[Obj]]) -> None:
    objs = overlays[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "Deployment", "Service", "InferencePool", "Gateway", "HTTPRoute"} <= kinds
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert namespaces == {one(objs, "Namespace")["metadata"]["name"]}, "everything in the overlay's namespace"


def test_every_component_combination_renders(combinations: dict[str, list[Obj]]) -> None:
    assert len(combinations) == len(COMBINATIONS)
    for name, objs in combinations.items():
        assert one(objs, "Deployment", "epp"), name


def test_every_component_is_used_by_an_overlay() -> None:
    used = set()
    for overlay in overlay_dirs():
        data = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in data.get("components", [])}
    unused = {d.name for d in component_dirs()} - used - {"plaintext", "tls-secret"}
    assert not unused, f"components no overlay uses: {sorted(unused)}"


def test_another_namespace_carries_through_to_every_reference(tmp_path: Path) -> None:
    components = ["namespace", "gateway-istio-envoyfilter", "model-sim-cpu", "ha"]
    objs = render(write_overlay(tmp_path, components, namespace="team-a", extra=envoyfilter_replacements()))
    assert one(objs, "Namespace")["metadata"]["name"] == "team-a"
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"team-a"}
    patches = {p["applyTo"]: p for p in one(objs, "EnvoyFilter")["spec"]["configPatches"]}
    cluster = patches["HTTP_FILTER"]["patch"]["value"]["typed_config"]["grpc_service"]["envoy_grpc"]
    assert cluster["cluster_name"] == "outbound|9002||epp.team-a.svc.cluster.local"
    for binding in of_kind(objs, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == "team-a"


def test_no_overlay_combines_plaintext_with_a_tls_only_gateway() -> None:
    for overlay in overlay_dirs():
        comps = {
            Path(c).name
            for c in yaml.safe_load((overlay / "kustomization.yaml").read_text()).get("components", [])
        }
        assert not ("plaintext" in comps and comps & set(TLS_ONLY_GATEWAYS)), overlay.name


# --- schema validation -------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_kinds_validate_strictly(version: str, every_render: dict[str, list[Obj]]) -> None:
    failures = []
    count = 0
    for where, obj in _unique_objects(every_render):
        if is_core(obj):
            count += 1
            for error in validate_core(obj, version):
                failures.append(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {error}")
    assert count > 10
    assert not failures, "\n".join(failures)


def test_custom_resources_validate_against_their_crds(
    every_render: dict[str, list[Obj]], catalog: CrdCatalog
) -> None:
    failures, checked, kinds = [], 0, set()
    for where, obj in _unique_objects(every_render):
        if is_core(obj):
            continue
        key = (obj["apiVersion"], obj["kind"])
        if key in NO_CRD_KINDS:
            continue
        if not catalog.knows(obj):
            failures.append(f"{where}: no CRD in {catalog.directory} for {key}")
            continue
        checked += 1
        kinds.add(obj["kind"])
        failures += [f"{where}: {obj['kind']}/{obj['metadata']['name']}: {e}" for e in catalog.validate(obj)]
    assert not failures, "\n".join(failures)
    assert {
        "InferencePool", "Gateway", "HTTPRoute", "EnvoyFilter", "DestinationRule",
        "PodMonitor", "ServiceMonitor", "PrometheusRule",
    } <= kinds  # fmt: skip
    assert catalog.cel_rules_evaluated > 50, "the CRDs' CEL rules were evaluated"


def test_the_validators_reject_what_the_api_server_would(
    overlays: dict[str, list[Obj]], catalog: CrdCatalog
) -> None:
    objs = overlays["istio-envoyfilter-vllm"]
    pool = one(objs, "InferencePool")
    typo = json.loads(json.dumps(pool))
    typo["spec"]["targetPort"] = 8000
    assert any("targetPort" in e for e in catalog.validate(typo))
    dup = json.loads(json.dumps(pool))
    dup["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    assert any("port number must be unique" in e for e in catalog.validate(dup))  # a CEL rule
    noport = json.loads(json.dumps(pool))
    del noport["spec"]["endpointPickerRef"]["port"]
    del noport["spec"]["endpointPickerRef"]["kind"]  # defaults to Service, which needs a port
    assert any("port is required" in e for e in catalog.validate(noport))
    route = json.loads(json.dumps(one(objs, "HTTPRoute")))
    route["spec"]["rules"][0]["matches"][0]["path"]["value"] = "no-slash"
    assert catalog.validate(route)
    dr = json.loads(json.dumps(one(objs, "DestinationRule")))
    dr["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] = "SOMETIMES"
    assert catalog.validate(dr)
    deployment = json.loads(json.dumps(one(objs, "Deployment", "epp")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validate_core(deployment, KUBERNETES_VERSIONS[-1])


def test_gke_policies_without_a_crd_point_at_the_pool(overlays: dict[str, list[Obj]]) -> None:
    objs = overlays["gke-vllm"]
    pool = one(objs, "InferencePool")
    for kind in ("HealthCheckPolicy", "GCPBackendPolicy"):
        policy = one(objs, kind)
        assert policy["apiVersion"] == "networking.gke.io/v1"
        assert policy["spec"]["targetRef"] == {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": pool["metadata"]["name"],
        }
    check = one(objs, "HealthCheckPolicy")["spec"]["default"]["config"]["httpHealthCheck"]
    assert check["port"] == pool["spec"]["targetPorts"][0]["number"]
    assert check["requestPath"] == "/health"
    assert one(objs, "GCPBackendPolicy")["spec"]["default"]["timeoutSec"] >= 300
    assert "timeouts" not in one(objs, "HTTPRoute")["spec"]["rules"][0], "GKE rejects HTTPRoute timeouts"


# --- epp's config and flags --------------------------------------------------------------------


def _epp_container(objs: list[Obj]) -> Obj:
    template = one(objs, "Deployment", "epp")["spec"]["template"]
    return next(c for c in template["spec"]["containers"] if c["name"] == "epp")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _container_env(container: Obj, objs: list[Obj], pod: Obj) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(objs, "ConfigMap", ref)["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = pod["metadata"]["namespace"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = f"{pod['metadata']['name']}-7d9f8-abcde"
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = "10.0.0.7"
    return env


def _expanded_args(objs: list[Obj], workload: Obj, container: Obj) -> list[str]:
    env = _container_env(container, objs, workload)
    args = [_expand(a, env) for a in container.get("args", [])]
    unresolved = [a for a in args if "$(" in a]
    assert not unresolved, f"{container['name']}: $(VAR) with no such variable: {unresolved}"
    return args


def _configmap_file(objs: list[Obj], template: Obj, path: str) -> str:
    """The content a container sees at `path`, through a configMap volume mount."""
    epp = next(c for c in template["spec"]["containers"] if c["name"] == "epp")
    for mount in epp["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
            cm = one(objs, "ConfigMap", volume["configMap"]["name"])
            return str(cm["data"][path[len(prefix) :]])
    raise AssertionError(f"{path} is not on a configMap volume")


def test_epp_configs_pass_check_config(every_render: dict[str, list[Obj]], tmp_path: Path) -> None:
    from epp.settings import parse_settings

    configs: dict[str, str] = {}
    for where, objs in every_render.items():
        workload = one(objs, "Deployment", "epp")
        settings = parse_settings(_expanded_args(objs, workload, _epp_container(objs)))
        assert settings.config_file is not None
        configs.setdefault(
            _configmap_file(objs, workload["spec"]["template"], str(settings.config_file)), where
        )
    assert len(configs) >= 2  # the default and the P/D config
    for n, (text, where) in enumerate(configs.items()):
        path = tmp_path / f"epp-config-{n}.yaml"
        path.write_text(text)
        proc = subprocess.run(
            [sys.executable, "-m", "epp", "--check-config", "--config-file", str(path)],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{where}: epp --check-config rejects its config:\n{proc.stderr}"


def test_epp_flags_agree_with_the_objects(every_render: dict[str, list[Obj]]) -> None:
    from epp.settings import parse_settings

    for where, objs in every_render.items():
        workload = one(objs, "Deployment", "epp")
        template = workload["spec"]["template"]
        container = _epp_container(objs)
        settings = parse_settings(_expanded_args(objs, workload, container))
        pool = one(objs, "InferencePool")
        service = one(objs, "Service", "epp")
        namespace = workload["metadata"]["namespace"]
        assert settings.pool_name == pool["metadata"]["name"], where
        assert settings.pool_namespace == namespace == pool["metadata"]["namespace"], where
        assert settings.pool_group == "inference.networking.k8s.io"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (settings.grpc_port, settings.grpc_health_port, settings.metrics_port) == (9002, 9003, 9090)
        assert ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}, where
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == settings.grpc_health_port, (where, probe)
        # The chart's probe names are the ones epp answers for this mode (epp.health).
        names = (
            ("readiness", "liveness") if settings.ha_enable_leader_election else ("inference-extension",) * 2
        )
        probed = (
            container["readinessProbe"]["grpc"]["service"],
            container["livenessProbe"]["grpc"]["service"],
        )
        assert probed == names, where
        env = {
            v["name"]: v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for v in container["env"]
        }
        assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}, where
        # The pool's endpoint picker is this Service and port, which reaches epp's ext_proc port.
        ref = pool["spec"]["endpointPickerRef"]
        assert (ref.get("group", ""), ref.get("kind", "Service"), ref["name"]) == ("", "Service", "epp")
        svc_port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
        assert container_port(template, svc_port["targetPort"]) == settings.grpc_port, where
        metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == "http-metrics")
        assert container_port(template, metrics_port["targetPort"]) == settings.metrics_port
        assert selects(service["spec"]["selector"], template["metadata"]["labels"])
        for other, other_template in pod_templates(objs):
            if other is not workload:
                assert not selects(service["spec"]["selector"], other_template["metadata"]["labels"]), where
        # TLS: epp's own self-signed certificate (no init container, no certificate volume), or
        # the Secret epp-tls mounted where --cert-path points.
        assert not template["spec"].get("initContainers"), where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets = [v for v in template["spec"]["volumes"] if "secret" in v]
        if settings.secure_serving and settings.cert_path is not None:
            assert str(settings.cert_path) in mounts, where
            (volume,) = secrets
            assert volume["name"] == mounts[str(settings.cert_path)]
            assert volume["secret"]["secretName"] == "epp-tls"
            assert settings.enable_cert_reload, f"{where}: a Secret's renewal is picked up"
        else:
            assert settings.cert_path is None and not secrets, where
        assert template["spec"]["serviceAccountName"] == "epp"
        assert one(objs, "ServiceAccount", "epp")


def _render_components(where: str) -> set[str]:
    """The components a render was made of (an overlay's kustomization, or a combination's name)."""
    if where.startswith("overlays/"):
        data = yaml.safe_load((OVERLAYS / where.removeprefix("overlays/") / "kustomization.yaml").read_text())
        return {Path(c).name for c in data.get("components", [])}
    return set(where.split("+"))


def test_epp_runs_the_charts_argument_vector_and_probes(every_render: dict[str, list[Obj]]) -> None:
    """The upstream chart's container, word for word (tests/deploy/chart.py), so what `make test`
    runs is what a user migrating from the chart runs; components append only ARG_ADDITIONS."""
    checked = set()
    for where, objs in every_render.items():
        workload = one(objs, "Deployment", "epp")
        container = _epp_container(objs)
        components = _render_components(where)
        ha = "ha" in components
        pool = one(objs, "InferencePool")["metadata"]
        expected = chart_args(pool["name"], pool["namespace"], ha=ha)
        for component, added in ARG_ADDITIONS.items():
            if component in components:
                expected += added
        assert _expanded_args(objs, workload, container) == expected, where
        assert container["args"][3] == "$(NAMESPACE)", "the pool namespace follows the overlay's"
        probes = {k: container[k] for k in ("livenessProbe", "readinessProbe")}
        assert probes == chart_probes(ha=ha), where
        assert workload["spec"]["replicas"] == (2 if ha else 1)
        checked.add((ha, *sorted(components & set(ARG_ADDITIONS))))
    assert checked >= {(False,), (True,), (False, "tls-secret"), (True, "plaintext")}


def test_the_written_out_vector_is_the_upstream_readmes() -> None:
    if not UPSTREAM_README.is_file():
        pytest.skip(f"{UPSTREAM_README} is absent")
    assert readme_chart_args() == list(CHART_ARGS)
    text = UPSTREAM_README.read_text()
    assert HA_FLAG in text and "`inference-extension`" in text and "`liveness` / `readiness`" in text


def test_the_pod_outlives_epps_drain(every_render: dict[str, list[Obj]]) -> None:
    """terminationGracePeriodSeconds covers the preStop sleep and --drain-timeout, so the kubelet
    does not kill epp while in-flight streams finish."""
    from epp.settings import parse_settings

    for where, objs in every_render.items():
        workload = one(objs, "Deployment", "epp")
        container = _epp_container(objs)
        settings = parse_settings(_expanded_args(objs, workload, container))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"] and command[2].startswith("sleep ")
        pre_stop_s = float(command[2].split()[1])
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > pre_stop_s + settings.drain_timeout_s, where


def test_sim_args_parse_with_the_simulators_parser(every_render: dict[str, list[Obj]]) -> None:
    from epp_bench.sim.__main__ import configs, parse_args

    seen = 0
    for where, objs in every_render.items():
        for workload, template in pod_templates(objs):
            for container in containers(template):
                if container.get("command", [])[:3] != ["python", "-m", "epp_bench.sim"]:
                    continue
                seen += 1
                assert container["image"] == EPP_IMAGE, "the simulator runs from the epp image"
                args = parse_args(_expanded_args(objs, workload, container))
                (cfg,) = configs(args)  # validates every knob
                assert args.host == "0.0.0.0"
                assert args.base_port == container_port(template, "http") == 8000
                pool = one(objs, "InferencePool")
                assert args.base_port in [p["number"] for p in pool["spec"]["targetPorts"]], where
                assert cfg.prefill_time_per_token_s > 0 and cfg.inter_token_latency_s > 0
    assert seen


# --- names, labels and ports across objects ----------------------------------------------------


def test_the_pool_selects_exactly_the_model_server_pods(every_render: dict[str, list[Obj]]) -> None:
    for where, objs in every_render.items():
        pool = one(objs, "InferencePool")
        selector = pool["spec"]["selector"]["matchLabels"]
        target = pool["spec"]["targetPorts"][0]["number"]
        model_servers = [(w, t) for w, t in pod_templates(objs) if w["metadata"]["name"] != "epp"]
        assert model_servers, where
        for workload, template in model_servers:
            labels = template["metadata"]["labels"]
            assert selects(selector, labels), (where, workload["metadata"]["name"])
            assert labels.get("llm-d.ai/inferenceServing") == "true"
            assert container_port(template, "http") == target, (where, workload["metadata"]["name"])
            assert selects(workload["spec"]["selector"]["matchLabels"], labels)
        epp = one(objs, "Deployment", "epp")["spec"]["template"]["metadata"]["labels"]
        assert not selects(selector, epp)


def test_routes_gateways_and_istio_objects_agree(every_render: dict[str, list[Obj]]) -> None:
    for where, objs in every_render.items():
        gateway = one(objs, "Gateway")
        route = one(objs, "HTTPRoute")
        pool = one(objs, "InferencePool")
        service = one(objs, "Service", "epp")
        namespace = service["metadata"]["namespace"]
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gateway["metadata"]["name"]
        listener = next(x for x in gateway["spec"]["listeners"] if x["name"] == parent["sectionName"])
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-ext-proc")
        envoyfilter = maybe(objs, "EnvoyFilter")
        if envoyfilter is None:
            assert (backend["group"], backend["kind"], backend["name"]) == (
                "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"],
            ), where  # fmt: skip
        else:
            # Istio without InferencePool support: a Service over the same pods, and the filter.
            assert (backend["kind"], backend["port"]) == ("Service", pool["spec"]["targetPorts"][0]["number"])
            placeholder = one(objs, "Service", backend["name"])
            assert placeholder["spec"]["selector"] == pool["spec"]["selector"]["matchLabels"]
            assert envoyfilter["spec"]["workloadSelector"]["labels"] == {
                "istio.io/gateway-name": gateway["metadata"]["name"]
            }
            patches = {p["applyTo"]: p for p in envoyfilter["spec"]["configPatches"]}
            assert set(patches) == {"CLUSTER", "HTTP_FILTER", "HTTP_ROUTE"}
            ext_proc = patches["HTTP_FILTER"]["patch"]["value"]["typed_config"]
            cluster = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
            assert cluster == f"outbound|{grpc_port}||epp.{namespace}.svc.cluster.local", where
            assert patches["HTTP_FILTER"]["match"]["listener"]["portNumber"] == listener["port"]
            assert patches["HTTP_ROUTE"]["match"]["routeConfiguration"]["portNumber"] == listener["port"]
            assert ext_proc["processing_mode"] == {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "response_body_mode": "FULL_DUPLEX_STREAMED",
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND",
            }
            dst = patches["CLUSTER"]["patch"]["value"]
            assert dst["type"] == "ORIGINAL_DST"
            assert dst["original_dst_lb_config"]["http_header_name"] == "x-gateway-destination-endpoint"
            assert patches["HTTP_ROUTE"]["patch"]["value"]["route"]["cluster"] == dst["name"]
        # Istio: the DestinationRule's TLS to epp's port matches epp's --secure-serving.
        dr = maybe(objs, "DestinationRule")
        gateway_class = gateway["spec"]["gatewayClassName"]
        secure = "--secure-serving=false" not in _epp_container(objs)["args"]
        if gateway_class == "istio":
            assert dr is not None, where
            assert dr["spec"]["host"] in ("epp", f"epp.{namespace}.svc.cluster.local")
            (level,) = dr["spec"]["trafficPolicy"]["portLevelSettings"]
            assert level["port"]["number"] == grpc_port
            assert level["tls"]["mode"] == ("SIMPLE" if secure else "DISABLE"), where
        else:
            assert dr is None
            assert secure, f"{where}: {gateway_class} dials the endpoint picker over TLS"


def test_references_resolve(every_render: dict[str, list[Obj]]) -> None:
    for where, objs in every_render.items():
        names = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for _workload, template in pod_templates(objs):
            spec = template["spec"]
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, (where, volume)
            for c in containers(template):
                for source in c.get("envFrom", []):
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                mounted = {v["name"] for v in spec.get("volumes", [])}
                assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted, (where, c["name"])
            if "serviceAccountName" in spec:
                assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for binding in of_kind(objs, "RoleBinding"):
            assert ("Role", binding["roleRef"]["name"]) in names
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount" and ("ServiceAccount", subject["name"]) in names
                assert subject["namespace"] == binding["metadata"]["namespace"]


def test_monitors_select_epp_and_the_model_servers(every_render: dict[str, list[Obj]]) -> None:
    rendered_any = False
    for where, objs in every_render.items():
        monitor = maybe(objs, "ServiceMonitor")
        if monitor is None:
            continue
        rendered_any = True
        service = one(objs, "Service", "epp")
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
            p["name"] for p in service["spec"]["ports"]
        }
        pods = one(objs, "PodMonitor")
        pool = one(objs, "InferencePool")
        assert pods["spec"]["selector"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
        for workload, template in pod_templates(objs):
            if selects(pool["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]):
                for endpoint in pods["spec"]["podMetricsEndpoints"]:
                    assert container_port(template, endpoint["port"]) == 8000, (
                        where,
                        workload["metadata"]["name"],
                    )
    assert rendered_any


# --- security ----------------------------------------------------------------------------------


def test_no_container_runs_as_root(every_render: dict[str, list[Obj]]) -> None:
    for where, objs in every_render.items():
        for workload, template in pod_templates(objs):
            pod_ctx = template["spec"].get("securityContext", {})
            assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
            for c in containers(template):
                ctx = {**pod_ctx, **c.get("securityContext", {})}
                who = f"{where}: {workload['metadata']['name']}/{c['name']}"
                assert ctx.get("runAsNonRoot") is True, who
                assert ctx.get("runAsUser", 1) != 0, who
                assert ctx.get("allowPrivilegeEscalation") is False, who
                assert "ALL" in ctx.get("capabilities", {}).get("drop", []), who
                assert not ctx.get("privileged"), who
                if c["image"] == EPP_IMAGE:
                    assert ctx.get("readOnlyRootFilesystem") is True, who


def test_roles_grant_no_write_verbs(every_render: dict[str, list[Obj]]) -> None:
    for where, objs in every_render.items():
        assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding"), where
        for role in of_kind(objs, "Role"):
            for rule in role["rules"]:
                verbs = set(rule["verbs"])
                assert "*" not in verbs and "*" not in rule["resources"], where
                assert "secrets" not in rule["resources"]
                if role["metadata"]["name"] == "epp":
                    assert verbs <= READ_VERBS, f"{where}: Role epp grants {sorted(verbs - READ_VERBS)}"
                elif verbs - READ_VERBS:
                    # The only write: the HA Lease.
                    assert role["metadata"]["name"] == "epp-leader-election", where
                    assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
                    assert verbs <= {"get", "create", "update"}
    base_rules = one(render(BASE), "Role", "epp")["rules"]
    # Exactly what epp watches: its pods, its pool, the objectives and rewrites naming the pool.
    granted = {(g, r) for rule in base_rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {
        ("", "pods"),
        (DEFAULT_POOL_GROUP, "inferencepools"),
        (OBJECTIVE_GROUP, OBJECTIVE_PLURAL),
        (REWRITE_GROUP, REWRITE_PLURAL),
    }


# --- each choice -------------------------------------------------------------------------------


def test_ha_runs_two_replicas_with_leader_election(overlays: dict[str, list[Obj]]) -> None:
    objs = overlays["kgateway-vllm-ha-monitoring"]
    deployment = one(objs, "Deployment", "epp")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--ha-enable-leader-election" in _epp_container(objs)["args"]
    binding = one(objs, "RoleBinding", "epp-leader-election")
    assert binding["roleRef"]["name"] == "epp-leader-election"
    for name, objs in overlays.items():
        if name != "kgateway-vllm-ha-monitoring":
            assert maybe(objs, "Role", "epp-leader-election") is None, "leases only with HA"


def test_vllm_gpu_serves_with_prefix_caching_and_16_token_blocks(overlays: dict[str, list[Obj]]) -> None:
    objs = overlays["kgateway-vllm"]
    template = one(objs, "Deployment", "vllm")["spec"]["template"]
    (vllm,) = template["spec"]["containers"]
    assert "--enable-prefix-caching" in vllm["args"] and "--block-size=16" in vllm["args"]
    assert "--port=8000" in vllm["args"] and container_port(template, "http") == 8000
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "8000"


def test_pd_has_role_labelled_prefill_and_decode_pods_behind_the_routing_sidecar(
    overlays: dict[str, list[Obj]],
) -> None:
    objs = overlays["kgateway-pd"]
    prefill = one(objs, "Deployment", "vllm-prefill")["spec"]["template"]
    decode = one(objs, "Deployment", "vllm-decode")["spec"]["template"]
    assert prefill["metadata"]["labels"]["llm-d.ai/role"] == "prefill"
    assert decode["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    (sidecar,) = decode["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert "llm-d-router-disagg-sidecar" in sidecar["image"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in sidecar["args"])
    (vllm,) = decode["spec"]["containers"]
    assert int(flags["port"]) == 8000 == container_port(decode, "http")
    assert f"--port={flags['vllm-port']}" in vllm["args"]
    assert flags["kv-connector"] == "nixlv2"
    for template in (prefill, decode):
        main = template["spec"]["containers"][0]
        assert any("NixlConnector" in a for a in main["args"])
    config = yaml.safe_load(_configmap_file(objs, one(objs, "Deployment", "epp")["spec"]["template"],
                                            "/config/default-plugins.yaml"))  # fmt: skip
    assert {p["type"] for p in config["plugins"]} >= {
        "disagg-profile-handler",
        "prefill-filter",
        "decode-filter",
    }
    assert {p["name"] for p in config["schedulingProfiles"]} == {"decode", "prefill"}


def test_sim_stages_are_sized_in_the_profile_configmap(overlays: dict[str, list[Obj]]) -> None:
    objs = overlays["kgateway-sim"]
    (profile,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("sim-profile-")]
    data = profile["data"]
    for knob in ("SIM_PREFILL_OVERHEAD_S", "SIM_PREFILL_TIME_PER_TOKEN_S", "SIM_MAX_NUM_BATCHED_TOKENS",
                 "SIM_INTER_TOKEN_LATENCY_S", "SIM_DECODE_TIME_PER_SEQ_S", "SIM_MAX_NUM_SEQS"):  # fmt: skip
        assert knob in data
    template = one(objs, "Deployment", "sim")["spec"]["template"]
    assert "nvidia.com/gpu" not in json.dumps(template)


# --- monitoring --------------------------------------------------------------------------------

_METRIC = re.compile(r"\b((?:vllm:|inference_|epp_|llm_d_)[a-zA-Z0-9_:]+)")
# epp's deprecated names (the Go EPP's older prefixes): still exposed, but queries use llm_d_epp_*.
_DEPRECATED = re.compile(
    r"\b(?:inference_objective_|inference_pool_|inference_extension_|llm_d_inference_scheduler_)"
)
# vLLM series the simulator does not emit (checked against vLLM's documented names, not here).
VLLM_ONLY = {
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
}


def _exposed(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.fixture(scope="module")
def exposed_metrics() -> set[str]:
    from prometheus_client import generate_latest

    from epp.framework import PluginHandle
    from epp.framework.registry import installed_registry
    from epp.observability import EppMetrics
    from epp.scheduling.loader import DEFAULT_CONFIG, load_config
    from epp_bench.sim.config import SimConfig
    from epp_bench.sim.engine import Engine
    from epp_bench.sim.metrics import SimMetrics

    # epp's own metrics, and those its default config's plugins register in the same registry.
    epp_metrics = EppMetrics()
    load_config(DEFAULT_CONFIG, installed_registry(), handle=PluginHandle(epp_metrics.registry))
    return _exposed(generate_latest(epp_metrics.registry).decode()) | _exposed(
        SimMetrics(Engine(SimConfig())).render().decode()
    )


def test_alerts_cover_the_failure_modes_and_use_real_metrics(
    overlays: dict[str, list[Obj]], exposed_metrics: set[str]
) -> None:
    objs = overlays["kgateway-vllm-ha-monitoring"]
    rules = [r for g in one(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules}
    assert {"EppDown", "EppNoReadyEndpoints", "EppHighErrorRate", "InferencePoolSaturated"} <= set(alerts)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        used = set(_METRIC.findall(rule["expr"]))
        assert used <= exposed_metrics, f"{rule['alert']}: unknown metrics {used - exposed_metrics}"
        assert not _DEPRECATED.search(rule["expr"]), f"{rule['alert']}: use the llm_d_epp_* names"
    assert 'job="epp"' in alerts["EppDown"]["expr"]
    service = one(objs, "Service", "epp")
    assert service["metadata"]["name"] == "epp", "the ServiceMonitor's job label is the Service name"


def test_the_grafana_dashboard_shows_what_the_issue_asks_for(
    overlays: dict[str, list[Obj]], exposed_metrics: set[str]
) -> None:
    objs = overlays["kgateway-vllm-ha-monitoring"]
    cm = one(objs, "ConfigMap", "epp-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["epp-dashboard.json"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    everything = " ".join(exprs.values())
    for needle in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:prefix_cache_hits_total",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "llm_d_epp_request_total",
        "llm_d_epp_request_error_total",
        "llm_d_epp_scheduler_e2e_duration_seconds_bucket",
        "llm_d_epp_ready_endpoints",
        "llm_d_epp_request_ttft_seconds_bucket",
    ):
        assert needle in everything, needle
    unknown = set(_METRIC.findall(everything)) - exposed_metrics - VLLM_ONLY
    assert not unknown, f"the dashboard queries metrics nothing exposes: {unknown}"
    assert not _DEPRECATED.search(json.dumps(dashboard)), "the dashboard should use the llm_d_epp_* names"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace"}


# --- the data path, for real: Envoy (from the EnvoyFilter) -> epp (TLS) -> a simulator ----------


def _envoy_bootstrap(objs: list[Obj], epp_port: int, secure: bool) -> dict[str, Any]:
    """The gateway Envoy an Istio without InferencePool support runs with the EnvoyFilter
    applied: its three patches verbatim, and epp's cluster with the DestinationRule's TLS."""
    from epp_bench.gateway import EPP_CLUSTER, render_envoy_config

    config = render_envoy_config("epp", listen_port=0, admin_port=0, epp_grpc_port=epp_port)
    patches = {p["applyTo"]: p["patch"]["value"] for p in one(objs, "EnvoyFilter")["spec"]["configPatches"]}
    ext_proc = json.loads(json.dumps(patches["HTTP_FILTER"]))
    ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = EPP_CLUSTER
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [ext_proc, *[f for f in hcm["http_filters"] if f["name"] != ext_proc["name"]]]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["route"].update(patches["HTTP_ROUTE"]["route"])
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != patches["CLUSTER"]["name"]] + [patches["CLUSTER"]]
    level = one(objs, "DestinationRule")["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]
    assert (level["mode"] == "SIMPLE") == secure
    if level["mode"] == "SIMPLE":
        assert level.get("insecureSkipVerify") is True
        epp = next(c for c in clusters if c["name"] == EPP_CLUSTER)
        epp["transport_socket"] = {  # what Istio makes of tls.mode SIMPLE + insecureSkipVerify
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "epp.llm.svc.cluster.local",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return config


# Flags EppProcess sets itself (standalone endpoints, free loopback ports), each with its value.
_LOCAL_FLAGS = ("--pool-name", "--pool-namespace", "--pool-group", "--grpc-port", "--grpc-health-port",
                "--metrics-port")  # fmt: skip


def _local_epp_args(objs: list[Obj], workdir: Path) -> list[str]:
    """The Deployment's epp flags, with the pool left to EppProcess (the simulator as a standalone
    endpoint) and the config volume's file written to `workdir`. EppProcess passes
    --secure-serving=false before these: the manifest's TLS setting is appended explicitly."""
    from epp.settings import parse_settings

    workload = one(objs, "Deployment", "epp")
    args = _expanded_args(objs, workload, _epp_container(objs))
    settings = parse_settings(args)
    config_text = _configmap_file(objs, workload["spec"]["template"], str(settings.config_file))
    (workdir / "default-plugins.yaml").write_text(config_text)
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        flag, has_value, _ = arg.partition("=")
        if flag in _LOCAL_FLAGS:
            if not has_value:
                next(rest)  # `--flag value`
            continue
        out.append(arg.replace("/config/", f"{workdir}/"))
    return [*out, f"--secure-serving={str(settings.secure_serving).lower()}"]


@pytest.mark.parametrize("variant", ["tls", "plaintext"])
async def test_the_manifests_data_path_routes_a_request(variant: str, tmp_path: Path) -> None:
    from epp_bench.gateway import EnvoyGateway, EppProcess
    from epp_bench.sim import start_simulator
    from epp_bench.sim.__main__ import configs, parse_args

    components = ["namespace", "gateway-istio-envoyfilter", "model-sim-cpu"]
    if variant == "plaintext":
        components.append("plaintext")
    objs = render(write_overlay(tmp_path / "overlay", components, extra=envoyfilter_replacements()))
    secure = "--secure-serving=false" not in _epp_container(objs)["args"]
    assert secure == (variant == "tls")
    # The simulator pod's own arguments (sped up twentyfold), on a loopback port.
    workload = one(objs, "Deployment", "sim")
    (sim_container,) = workload["spec"]["template"]["spec"]["containers"]
    (cfg,) = configs(parse_args(_expanded_args(objs, workload, sim_container)))
    sim = await start_simulator(dataclasses.replace(cfg, name="sim-0", time_factor=cfg.time_factor / 20))
    try:
        epp_args = _local_epp_args(objs, tmp_path)
        async with EppProcess([sim.address], extra_args=epp_args) as epp:
            gateway = EnvoyGateway("epp", epp_grpc_port=epp.grpc_port)
            gateway.config = _envoy_bootstrap(objs, epp.grpc_port, secure)
            async with gateway:
                body = {"model": cfg.model, "prompt": "hello " * 50, "max_tokens": 4}
                async with aiohttp.ClientSession() as session:
                    async with session.post(f"{gateway.url}/v1/completions", json=body) as resp:
                        text = await resp.text()
                        assert resp.status == 200, (
                            f"{resp.status} {text}\n{gateway.log_tail()}\n{epp.log_tail()}"
                        )
                        assert resp.headers.get("x-served-by") == "sim-0"
                    stats = await gateway.stats("ext_proc")
                    assert any(k.endswith("streams_started") and v >= 1 for k, v in stats.items()), stats
                    if secure:
                        ssl = await gateway.stats("cluster.epp.ssl.handshake")
                        assert sum(ssl.values()) >= 1, f"epp was not reached over TLS: {ssl}"
    finally:
        await sim.stop()
        await asyncio.sleep(0)


# --- the image ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    lines = []
    joined = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            lines.append((instruction.upper(), rest.strip()))
    return lines


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    instructions = _dockerfile()
    froms = [rest for ins, rest in instructions if ins == "FROM"]
    args = dict(rest.split("=", 1) for ins, rest in instructions if ins == "ARG" and "=" in rest)
    assert len(froms) == 2 and froms[0].endswith("AS builder")
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = instructions[[i for i, (ins, _) in enumerate(instructions) if ins == "FROM"][-1] :]
    final_text = "\n".join(f"{ins} {rest}" for ins, rest in final)
    assert "COPY --from=builder /opt/venv /opt/venv" in final_text
    assert "pip install" not in final_text, "the runtime stage only copies the venv"
    (user,) = [rest for ins, rest in final if ins == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert [rest for ins, rest in final if ins == "ENTRYPOINT"] == ['["epp"]']
    exposed = {p for ins, rest in final if ins == "EXPOSE" for p in rest.split()}
    assert exposed == {"9002", "9003", "9090"}
    env = " ".join(rest for ins, rest in final if ins == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    # The manifests run the image as the same user.
    for objs in (render(OVERLAYS / "kgateway-sim"),):
        for _, template in pod_templates(objs):
            if any(c["image"] == EPP_IMAGE for c in containers(template)):
                assert template["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_dockerfile_copies_only_what_exists_and_dockerignore_keeps_it() -> None:
    ignored = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    for must in (".venv", ".venv-tools", ".git", "tests"):
        assert must in ignored
    for ins, rest in _dockerfile():
        if ins == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing"
                assert source.rstrip("/") not in ignored, f"COPY {source} is excluded by .dockerignore"
    # epp and, for the simulator, the bench distribution (bench/pyproject.toml: epp_bench).
    assert "pip install . ./bench " in (REPO / "Dockerfile").read_text(), "the image's packages"


def test_one_image_override_moves_epp_and_the_simulator(tmp_path: Path) -> None:
    images = "images:\n- name: epp\n  newName: registry.example.com/epp\n  newTag: 0.1.0\n"
    objs = render(write_overlay(tmp_path, ["namespace", "gateway-kgateway", "model-sim-cpu"], extra=images))
    ours = [c["image"] for _, t in pod_templates(objs) for c in containers(t) if "epp" in c["image"]]
    assert len(ours) == 2  # epp, the simulator
    assert set(ours) == {"registry.example.com/epp:0.1.0"}


def test_make_image_builds_epp_dev() -> None:
    proc = subprocess.run(["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "docker build -t epp:dev ." in proc.stdout


# --- the guide ---------------------------------------------------------------------------------


def test_the_deploy_guide_covers_every_overlay_and_component() -> None:
    guide = (REPO / "deploy" / "README.md").read_text()
    for overlay in overlay_dirs():
        assert f"kubectl apply -k deploy/overlays/{overlay.name}" in guide, overlay.name
        assert f"kubectl delete -k deploy/overlays/{overlay.name}" in guide, overlay.name
    for component in component_dirs():
        assert f"components/{component.name}" in guide, component.name
    for pin in ("v1.6.1", "v1.6.0"):  # Gateway API and InferencePool CRD versions
        assert pin in guide
    assert "--check-config" in guide and "weight" in guide
    assert COMPONENTS.is_dir()
