"""The deployment files: Kubernetes manifests validated against the Kubernetes schemas (no cluster needed),
their settings checked against what the server does, and the nginx proxy config accepted by nginx itself."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fleet.procs import free_port, need, render_nginx
from server.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33.0"  # preStop `sleep` handlers need >= 1.30


def objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def kind(name: str) -> dict:
    found = [doc for _, doc in objects() if doc["kind"] == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("name,doc", objects(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_every_manifest_validates_against_the_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises ValidationError naming the field


def test_kustomization_lists_every_manifest_and_its_env_names_real_flags():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    flags = {a.dest.upper() for a in build_parser()._actions}
    env = [lit.split("=", 1)[0] for gen in kust["configMapGenerator"] for lit in gen.get("literals", [])]
    ours = [e.removeprefix("SEARCHREC_") for e in env if e.startswith("SEARCHREC_")]
    assert ours and not set(ours) - flags, f"not server flags: {set(ours) - flags}"
    for gen in kust["configMapGenerator"]:
        for f in gen.get("files", []):
            assert (K8S / f).exists()


def test_replicas_have_grpc_probes_a_long_startup_a_matching_drain_and_a_read_only_bundle():
    dep = kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a cold load takes minutes
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    lits = dict(lit.split("=", 1) for g in kust["configMapGenerator"] for lit in g.get("literals", []))
    grace = float(lits["SEARCHREC_GRACE_S"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace  # the kubelet never kills a drain midway
    assert lits["SEARCHREC_STATE"].startswith("redis://")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["bundles"]["readOnly"] is True
    vol = next(v for v in pod["volumes"] if v["name"] == "bundles")
    assert vol["persistentVolumeClaim"]["readOnly"] is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    secret_env = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert "SEARCHREC_STATE_PASSWORD" in secret_env  # never a literal in the ConfigMap
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_disruption_budget_and_autoscaler_target_the_replicas():
    labels = kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = kind("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment" and hpa["scaleTargetRef"]["name"] == "searchrec"
    assert hpa["minReplicas"] >= 2


def test_redis_keeps_every_acknowledged_write_on_a_persistent_volume():
    conf = (K8S / "redis.conf").read_text()
    settings = dict(re.findall(r"^(\w[\w-]*)\s+(.+)$", conf, re.M))
    assert settings["appendonly"] == "yes" and settings["appendfsync"] == "always"
    assert settings["maxmemory-policy"] == "noeviction"
    sts = kind("StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in c["volumeMounts"])
    assert "/etc/redis/redis.conf" in c["args"]


def test_nginx_accepts_the_proxy_config(tmp_path):
    conf = tmp_path / "nginx.conf"
    (tmp_path / "logs").mkdir()
    conf.write_text(render_nginx(free_port(), [free_port(), free_port()], tmp_path, max_conns=8))
    check = subprocess.run([need("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "grpc_pass grpc://searchrec" in conf.read_text() and "http2" in conf.read_text()
