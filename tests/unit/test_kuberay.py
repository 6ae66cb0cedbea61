"""deploy/kuberay/ against what KubeRay v1.7.0 accepts: its CRD schemas (vendored, tests/kuberay/SOURCE.md),
strictly (a field the schema does not know is pruned by the API server without a word, so it is an error
here), and the operator's own rules from ray-operator/controllers/ray/utils/validation.go at that tag."""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parents[1] / "kuberay"
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}  # validation.go
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


@lru_cache
def schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def unknown_fields(value, node: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (what `kubectl apply --validate=strict` refuses)."""
    out = []
    if isinstance(value, dict) and node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict) and "properties" in node:
        for key, item in value.items():
            if key in node["properties"]:
                out += unknown_fields(item, node["properties"][key], f"{path}.{key}")
            elif not node.get("additionalProperties"):
                out.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, item in value.items():
            out += unknown_fields(item, node["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            out += unknown_fields(item, node["items"], f"{path}[{i}]")
    return out


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]


def operator_rules(kind: str, doc: dict) -> list[str]:
    """The rules of validation.go these files could break (the messages paraphrase the operator's)."""
    errors, name = [], doc["metadata"]["name"]
    if len(name) > NAME_LIMITS[kind] or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"{kind} name {name!r}: a DNS-1035 label of at most {NAME_LIMITS[kind]} characters")
    cluster = doc["spec"] if kind == "RayCluster" else None
    job = doc["spec"] if kind == "RayJob" else doc["spec"].get("jobTemplate") if kind == "RayCronJob" else None
    if job is not None:
        cluster = job.get("rayClusterSpec")
        selector = job.get("clusterSelector")
        if cluster is None and not selector:
            errors.append("one of RayClusterSpec or ClusterSelector must be set")
        if selector is not None and not selector.get("ray.io/cluster"):
            errors.append("cluster name in ClusterSelector should not be empty")
        if job.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            errors.append(f"submissionMode {job['submissionMode']!r} is not one of {SUBMISSION_MODES}")
    if kind == "RayCronJob" and re.search(r"\b(CRON_)?TZ=", doc["spec"]["schedule"]):
        errors.append("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")
    if cluster is None:
        return errors
    auth = cluster.get("authOptions") or {}
    if auth.get("mode", "token") == "token" and auth:
        version = tuple(int(p) for p in str(cluster.get("rayVersion", "0")).split(".")[:2])
        if version < (2, 52):
            errors.append("authOptions.mode is 'token': Ray version 2.52.0 or later is required")
    names = [group for group, _ in _groups(cluster)]
    if len(set(names)) != len(names):
        errors.append("worker group names must be unique")
    for group, spec in _groups(cluster):
        params = spec.get("rayStartParams") or {}
        if "labels" in params:
            errors.append(f"rayStartParams['labels'] is not supported for {group} group; use the top-level labels")
        containers = spec["template"]["spec"].get("containers") or []
        if not containers:
            errors.append(f"{group} group should have at least one container")
        if any(k in params for k in RESOURCE_PARAMS) and (spec.get("resources") or any(c.get("resources")
                                                                                     for c in containers[:1])):
            errors.append(f"resource fields set in both rayStartParams and Resources for {group} group")
        command = " ".join(containers[0].get("command", []) + containers[0].get("args", [])) if containers else ""
        overwrite = (spec["template"].get("metadata", {}).get("annotations", {})
                     .get("ray.io/overwrite-container-cmd") == "true")
        if command and "ray start" not in command and not overwrite:
            errors.append(f"{group} group: KubeRay runs `{command} && ulimit …; ray start …`; leave command unset")
        if group != "head" and ("minReplicas" not in spec or "maxReplicas" not in spec):
            errors.append(f"worker group {group} must set both minReplicas and maxReplicas")
        elif group != "head" and spec["minReplicas"] > spec["maxReplicas"]:
            errors.append(f"worker group {group} has minReplicas greater than maxReplicas")
    return errors


def check(kind: str, doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema(kind))
    return ([f"schema: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
            + [f"unknown field (pruned by the API server): {p}" for p in unknown_fields(doc, schema(kind))]
            + operator_rules(kind, doc))


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1].get("apiVersion") == "ray.io/v1"],
                         ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_each_ray_object_is_one_kuberay_1_7_accepts(name, doc):
    assert check(doc["kind"], doc) == []


def test_the_checks_catch_what_the_manifests_got_wrong_before():
    cluster = next(doc for _, doc in documents() if doc.get("kind") == "RayCluster")
    bad = copy.deepcopy(cluster)
    worker = bad["spec"]["workerGroupSpecs"][0]
    worker["rayStartParams"] = {"num-cpus": "8", "labels": "adtr-role=trainer"}
    worker["template"]["spec"]["containers"][0]["command"] = ["ray"]
    bad["spec"]["headGroupSpec"]["rayStartParams"]["labelz"] = "x"  # a map: any key is schema-valid
    bad["spec"]["authOptions"]["secretNme"] = "typo"
    errors = "\n".join(check("RayCluster", bad))
    assert "rayStartParams['labels']" in errors and "both rayStartParams and Resources" in errors
    assert "ulimit" in errors and "spec.authOptions.secretNme" in errors
    cron = copy.deepcopy(next(doc for _, doc in documents() if doc.get("kind") == "RayCronJob"))
    cron["spec"]["schedule"] = "CRON_TZ=UTC 30 2 * * *"
    cron["spec"]["jobTemplate"]["submissionMode"] = "HttpMode"
    errors = "\n".join(check("RayCronJob", cron))
    assert "timeZone" in errors and "submissionMode" in errors


def test_the_agent_deployment_recreates_waits_for_startup_and_asks_for_cpus_a_node_has():
    deployment = next(doc for _, doc in documents() if doc.get("kind") == "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 180
    args = container["args"]
    assert "inference.num_cpus=3" in args
