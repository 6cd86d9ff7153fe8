#!/usr/bin/env python3
"""Checks on the rendered install (run by scripts/test-manifests, which renders first).

    check_manifests.py --rendered DIR --bin PATH

DIR holds the `kubectl kustomize` output of each kustomization, named as in RENDERS. Every case
runs even when an earlier one failed; the last line is "N passed, M failed" and the exit code is
non-zero when anything failed.
"""

import argparse
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import yaml

import pods
from cel_eval import CEL, ERROR, policy_decision, selector_matches, webhook_called

ROOT = Path(__file__).resolve().parents[2]
NS = "istio-vault-webhook"
NAME = "istio-vault-webhook"
INJECT_LABEL = {"istio-vault-webhook/inject": "enabled"}
VAULT_INJECTOR_CFG = "vault-agent-injector-cfg"

# render name -> kustomization (relative to the repository root)
RENDERS = {
    "base": "manifests",
    "cluster1": "manifests/overlays/cluster1",
    "cluster2": "manifests/overlays/cluster2",
    "cert-manager": "tests/manifests/kustomize/cert-manager",
    "reinvocation": "tests/manifests/kustomize/reinvocation",
}
# Strict schema validation against the oldest Kubernetes the install supports (1.30: first with
# ValidatingAdmissionPolicy v1 and webhook matchConditions GA) and the newest the validator knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
BASE_KINDS = sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                     "ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "NetworkPolicy",
                     "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding"])

CASES = []


def case(fn):
    CASES.append(fn)
    return fn


class Ctx:
    def __init__(self, rendered_dir, binary, helm):
        self.binary = Path(binary)
        self.helm = helm
        self.renders = {}
        for name in RENDERS:
            text = (Path(rendered_dir) / f"{name}.yaml").read_text()
            self.renders[name] = [d for d in yaml.safe_load_all(text) if d]
        # The Helm chart with the settings of each kustomize render: the same objects (checked
        # below), so every other case checks them too.
        for name, values in chart_values(self).items():
            self.renders[f"chart:{name}"] = helm_template(self, values)

    def ours(self, name):
        """The objects of one render that belong to the webhook (not the Vault chart's)."""
        return [d for d in self.renders[name] if d["metadata"]["name"] != VAULT_INJECTOR_CFG]


# --------------------------------------------------------------------------------------------
# The Helm chart (manifests/chart/istio-vault-webhook)
# --------------------------------------------------------------------------------------------

CHART = ROOT / "manifests/chart/istio-vault-webhook"
HELM_LABELS = {"app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
               "helm.sh/chart"}


def helm_template(ctx, values, expect_error=False):
    """`helm template` of the chart with `values` (a dict), as objects; or its stderr."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(values, f)
        f.flush()
        p = subprocess.run([ctx.helm, "template", "istio-vault-webhook", str(CHART), "-n", NS, "-f", f.name],
                           capture_output=True, text=True)
    if expect_error:
        assert p.returncode != 0, f"helm template accepted {values}"
        return p.stderr
    assert p.returncode == 0, f"helm template: {p.stderr}"
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def chart_values(ctx):
    """Chart values equal to each kustomize render's settings."""
    def config(name):
        return config_of(ctx.renders[name])
    return {
        "base": {"config": config("base"), "createNamespace": True},
        "cluster1": {"config": config("cluster1"), "createNamespace": True},
        "cluster2": {"config": config("cluster2"), "createNamespace": True},
        "cert-manager": {"config": config("cluster1"), "tls": {"mode": "certManager"}, "createNamespace": True},
    }


def normalized(docs):
    """Objects keyed by kind/name, without Helm's own labels, config.yaml parsed (comments and
    key order are not the install)."""
    out = {}
    for d in copy.deepcopy(docs):
        for meta in (d["metadata"], d.get("spec", {}).get("template", {}).get("metadata", {})):
            labels = meta.get("labels")
            if labels is not None:
                for k in HELM_LABELS:
                    labels.pop(k, None)
        if d["kind"] == "ConfigMap":
            d["data"]["config.yaml"] = yaml.safe_load(d["data"]["config.yaml"])
        out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


def get(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs):
    cs = get(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, "the webhook Pod has exactly one container"
    return cs[0]


def config_of(docs):
    cm = get(docs, "ConfigMap", NAME)
    return yaml.safe_load(cm["data"]["config.yaml"])


def flag(args, name):
    vals = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return vals[0] if vals else None


# --------------------------------------------------------------------------------------------
# Strict schema validation
# --------------------------------------------------------------------------------------------

# cert-manager's CRDs are not in the Kubernetes schemas: check the fields we use against the
# cert-manager.io/v1 API (pkg/apis/certmanager/v1/types_{certificate,issuer}.go), refusing unknown ones.
CERT_MANAGER_FIELDS = {
    "Certificate": {"commonName", "dnsNames", "duration", "renewBefore", "secretName", "isCA", "privateKey",
                    "usages", "issuerRef", "subject", "ipAddresses", "uris", "emailAddresses",
                    "secretTemplate", "keystores", "revisionHistoryLimit", "additionalOutputFormats",
                    "literalSubject", "encodeUsagesInRequest", "nameConstraints", "otherNames"},
    "Issuer": {"selfSigned", "ca", "acme", "vault", "venafi"},
}
CERT_MANAGER_NESTED = {
    "privateKey": {"algorithm", "size", "encoding", "rotationPolicy"},
    "issuerRef": {"name", "kind", "group"},
}
CERT_MANAGER_USAGES = {"signing", "digital signature", "content commitment", "key encipherment",
                       "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                       "decipher only", "any", "server auth", "client auth", "code signing",
                       "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                       "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}


def check_cert_manager(doc):
    assert doc["apiVersion"] == "cert-manager.io/v1", doc["apiVersion"]
    kind = doc["kind"]
    assert kind in CERT_MANAGER_FIELDS, f"unexpected cert-manager kind {kind}"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, set(doc)
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}, doc["metadata"]
    spec = doc["spec"]
    unknown = set(spec) - CERT_MANAGER_FIELDS[kind]
    assert not unknown, f"{kind}/{doc['metadata']['name']}: unknown fields {unknown}"
    for key, allowed in CERT_MANAGER_NESTED.items():
        if key in spec:
            assert not set(spec[key]) - allowed, f"{kind}.spec.{key}: unknown {set(spec[key]) - allowed}"
    if kind == "Certificate":
        assert spec["secretName"] and spec["issuerRef"]["name"]
        for d in ("duration", "renewBefore"):
            if d in spec:
                assert re.fullmatch(r"\d+h", spec[d]), f"{d} {spec[d]!r}"
        assert set(spec.get("usages", [])) <= CERT_MANAGER_USAGES
        pk = spec.get("privateKey", {})
        assert pk.get("algorithm") in (None, "RSA", "ECDSA", "Ed25519")
        assert pk.get("rotationPolicy") in (None, "Never", "Always")
    else:
        assert len(spec) == 1, "an Issuer has exactly one issuer type"
        if "ca" in spec:
            assert set(spec["ca"]) <= {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"}
        if "selfSigned" in spec:
            assert set(spec["selfSigned"]) <= {"crlDistributionPoints"}


def strict_errors(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        return [f"{doc['kind']}/{doc['metadata'].get('name')} @ {path or '.'}: {e.message} (k8s {version})"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


@case
def every_render_validates_strictly(ctx):
    errors = []
    for name, docs in ctx.renders.items():
        for doc in ctx.ours(name):
            if doc["apiVersion"].startswith("cert-manager.io/"):
                check_cert_manager(doc)
                continue
            for v in K8S_VERSIONS:
                errors += [f"[{name}] {e}" for e in strict_errors(doc, v)]
    assert not errors, "\n".join(errors)


@case
def strict_validation_rejects_unknown_and_missing_fields(ctx):
    """The validator really is strict: a typo and a missing required field are refused."""
    dep = copy.deepcopy(get(ctx.renders["base"], "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert strict_errors(dep, K8S_VERSIONS[0]), "a misspelled field passed strict validation"
    mwc = copy.deepcopy(get(ctx.renders["base"], "MutatingWebhookConfiguration"))
    del mwc["webhooks"][0]["sideEffects"]
    assert strict_errors(mwc, K8S_VERSIONS[0]), "a webhook without sideEffects passed validation"
    vap = copy.deepcopy(get(ctx.renders["base"], "ValidatingAdmissionPolicy"))
    vap["spec"]["validations"][0]["expresion"] = "true"
    assert strict_errors(vap, K8S_VERSIONS[0]), "a misspelled VAP field passed strict validation"


@case
def vault_token_reviewer_manifest_validates_strictly(ctx):
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests/vault/token-reviewer.yaml").read_text()) if d]
    errors = [e for d in docs for v in K8S_VERSIONS for e in strict_errors(d, v)]
    assert not errors, "\n".join(errors)
    crb = get(docs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == "system:auth-delegator", "the reviewer gets TokenReview rights only"


# --------------------------------------------------------------------------------------------
# Shape of the install
# --------------------------------------------------------------------------------------------

@case
def base_and_overlays_render_exactly_the_install(ctx):
    for name in ("base", "cluster1", "cluster2"):
        kinds = sorted(d["kind"] for d in ctx.renders[name])
        assert kinds == BASE_KINDS, f"[{name}] kinds {kinds}"


@case
def overlays_change_nothing_but_the_configmap(ctx):
    def strip(docs):
        return sorted((json.dumps(d, sort_keys=True) for d in docs if d["kind"] != "ConfigMap"))
    base = strip(ctx.renders["base"])
    for name in ("cluster1", "cluster2"):
        assert strip(ctx.renders[name]) == base, f"[{name}] differs from the base outside the ConfigMap"


@case
def namespaces_and_labels(ctx):
    for name in RENDERS:
        for d in ctx.ours(name):
            md, what = d["metadata"], f"[{name}] {d['kind']}/{d['metadata']['name']}"
            if d["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in md, f"{what}: cluster-scoped object with a namespace"
            else:
                assert md.get("namespace") == NS, f"{what}: namespace {md.get('namespace')}"
            labels = md.get("labels", {})
            # uninstall selects by this label (the README (Install on a cluster))
            assert labels.get("app.kubernetes.io/part-of") == NAME, f"{what}: no part-of label"


@case
def own_namespace_enforces_restricted_and_is_not_injected(ctx):
    for name in RENDERS:
        ns = get(ctx.renders[name], "Namespace", NS)
        labels = ns["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        for k in INJECT_LABEL:
            assert k not in labels, "the webhook's own namespace must never be opted in"


# --------------------------------------------------------------------------------------------
# RBAC: least privilege
# --------------------------------------------------------------------------------------------

def rbac_rules(docs):
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            for r in d.get("rules", []):
                yield d, r


@case
def rbac_has_no_wildcards_no_secrets_no_dangerous_verbs(ctx):
    for name in RENDERS:
        for d, r in rbac_rules(ctx.ours(name)):
            what = f"[{name}] {d['kind']}/{d['metadata']['name']}"
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in r.get(field, []), f"{what}: wildcard in {field}"
            assert "secrets" not in r.get("resources", []), f"{what}: grants access to Secrets"
            bad = set(r["verbs"]) & {"create", "delete", "deletecollection", "escalate", "bind", "impersonate", "approve", "sign"}
            assert not bad, f"{what}: verbs {bad}"
            assert r.get("resourceNames"), f"{what}: every rule is limited to named objects"
            assert "aggregationRule" not in d


@case
def role_reads_only_its_configmap(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        role = get(docs, "Role")
        assert role["metadata"]["namespace"] == NS
        assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [NAME],
                                  "verbs": ["get", "list", "watch"]}], role["rules"]
        cm_flag = flag(container(docs)["args"], "--config-map")
        assert cm_flag == f"$(POD_NAMESPACE)/{get(docs, 'ConfigMap')['metadata']['name']}", cm_flag
        rb = get(docs, "RoleBinding")
        assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NS}]


@case
def clusterrole_only_updates_its_own_webhook_configuration(ctx):
    for name in ("base", "cluster1", "cluster2", "reinvocation"):
        docs = ctx.ours(name)
        mwc_name = get(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
        cr = get(docs, "ClusterRole")
        assert cr["rules"] == [{"apiGroups": ["admissionregistration.k8s.io"],
                                "resources": ["mutatingwebhookconfigurations"], "resourceNames": [mwc_name],
                                "verbs": ["get", "list", "watch", "update"]}], cr["rules"]
        args = container(docs)["args"]
        assert "--tls-self-signed" in args and flag(args, "--webhook-config") == mwc_name
        crb = get(docs, "ClusterRoleBinding")
        assert crb["roleRef"]["name"] == cr["metadata"]["name"] and crb["roleRef"]["kind"] == "ClusterRole"
        assert crb["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NS}]
        assert get(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == NAME


# --------------------------------------------------------------------------------------------
# The Deployment: Pod Security "restricted", availability, probes, resources, image
# --------------------------------------------------------------------------------------------

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}


def assert_pss_restricted(pod_spec, what):
    """The Pod Security Standards "restricted" profile (baseline included), as the API server's
    PodSecurity admission checks it."""
    psc = pod_spec.get("securityContext", {})
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(f), f"{what}: {f}"
    for v in pod_spec.get("volumes", []):
        kinds = set(v) - {"name"}
        assert kinds <= RESTRICTED_VOLUME_TYPES, f"{what}: volume {v['name']} of type {kinds}"
    assert not psc.get("sysctls"), f"{what}: sysctls"
    assert psc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), f"{what}: pod seccomp"
    assert psc.get("runAsNonRoot") is True, f"{what}: pod runAsNonRoot"
    assert psc.get("runAsUser", 1) != 0 and psc.get("runAsGroup", 1) != 0, f"{what}: root uid/gid"
    assert psc.get("seLinuxOptions", {}).get("type") in (None, "", "container_t", "container_init_t", "container_kvm_t")
    all_containers = pod_spec["containers"] + pod_spec.get("initContainers", []) + pod_spec.get("ephemeralContainers", [])
    for c in all_containers:
        sc, cw = c.get("securityContext", {}), f"{what}: container {c['name']}"
        assert sc.get("privileged") in (None, False), f"{cw}: privileged"
        assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation"
        assert sc.get("runAsNonRoot") in (None, True) and sc.get("runAsUser", 1) != 0, f"{cw}: root"
        assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: must drop ALL capabilities"
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, f"{cw}: adds capabilities"
        assert sc.get("seccompProfile", {}).get("type") in (None, "RuntimeDefault", "Localhost"), f"{cw}: seccomp"
        assert sc.get("procMount") in (None, "Default"), f"{cw}: procMount"
        assert sc.get("windowsOptions", {}).get("hostProcess") in (None, False), f"{cw}: hostProcess"
        for p in c.get("ports", []):
            assert not p.get("hostPort"), f"{cw}: hostPort"


@case
def deployment_is_pss_restricted(ctx):
    for name in RENDERS:
        assert_pss_restricted(get(ctx.ours(name), "Deployment")["spec"]["template"]["spec"], f"[{name}]")


@case
def pss_checker_catches_violations(ctx):
    spec = get(ctx.renders["base"], "Deployment")["spec"]["template"]["spec"]
    for breaker in (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
                    lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
                    lambda s: s["securityContext"].pop("seccompProfile"),
                    lambda s: s.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
                    lambda s: s["securityContext"].update(runAsUser=0)):
        broken = copy.deepcopy(spec)
        breaker(broken)
        try:
            assert_pss_restricted(broken, "broken")
        except AssertionError:
            continue
        raise AssertionError("the PSS checker accepted a violating Pod spec")


@case
def deployment_is_highly_available(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        dep = get(docs, "Deployment")
        spec, tmpl = dep["spec"], dep["spec"]["template"]
        pod_labels = tmpl["metadata"]["labels"]
        assert spec["replicas"] >= 2
        assert selector_matches(spec["selector"], pod_labels)
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "rollouts keep every replica serving"
        tsc = {c["topologyKey"]: c for c in tmpl["spec"]["topologySpreadConstraints"]}
        host = tsc["kubernetes.io/hostname"]
        assert host["whenUnsatisfiable"] == "DoNotSchedule" and host["maxSkew"] == 1
        assert selector_matches(host["labelSelector"], pod_labels)
        pdb = get(docs, "PodDisruptionBudget")
        assert selector_matches(pdb["spec"]["selector"], pod_labels)
        if "maxUnavailable" in pdb["spec"]:
            assert pdb["spec"]["maxUnavailable"] == 1
        else:
            assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"], "the PDB must allow a drain"
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"


@case
def container_ports_probes_resources_env(ctx):
    for name in RENDERS:
        c = container(ctx.ours(name))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"https": 8443, "admin": 8080}, ports
        args = c["args"]
        assert args[0] == "serve"
        assert flag(args, "--listen").endswith(":8443") and flag(args, "--admin-listen").endswith(":8080")
        assert flag(args, "--log-format") == "json"
        assert flag(args, "--service-name") == get(ctx.ours(name), "Service")["metadata"]["name"]
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            g = c[probe]["httpGet"]
            assert g["path"] == path and g["port"] in ("admin", 8080), (probe, g)
            assert g.get("scheme", "HTTP") == "HTTP"
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        res = c["resources"]
        assert res["requests"] == {"cpu": "20m", "memory": "32Mi"}, res
        assert res["limits"] == {"memory": "128Mi"}, "a memory limit, no CPU limit"
        # preStop sleep, then the SIGTERM drain (--drain-timeout, default 20s), inside the grace period
        drain = int((flag(args, "--drain-timeout") or "20s").rstrip("s"))
        grace = get(ctx.ours(name), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 0 < c["lifecycle"]["preStop"]["sleep"]["seconds"] + drain < grace, (drain, grace)


@case
def image_is_pinned_to_the_crate_version(ctx):
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    for name in RENDERS:
        c = container(ctx.ours(name))
        image = c["image"]
        m = re.fullmatch(r"(?P<repo>[^@:]+(?::\d+)?/[^@:]+)(?::(?P<tag>[^@]+))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?", image)
        assert m, f"unparseable image {image!r}"
        assert m["repo"].endswith("/istio-vault-webhook"), image
        assert m["tag"] == version or m["digest"], f"image {image!r} is not pinned to {version}"
        assert m["tag"] != "latest"
        assert c["imagePullPolicy"] == "IfNotPresent"


@case
def service_exposes_only_https(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        svc = get(docs, "Service")
        pod_labels = get(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https",
                                         "protocol": "TCP", "appProtocol": "https"}], svc["spec"]["ports"]


@case
def networkpolicy_admits_only_https_and_admin(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        np = get(docs, "NetworkPolicy")["spec"]
        pod_labels = get(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(np["podSelector"], pod_labels) and np["podSelector"], "selects the webhook Pods"
        assert set(np["policyTypes"]) == {"Ingress", "Egress"}
        ingress = sorted((p.get("protocol", "TCP"), p["port"]) for r in np["ingress"] for p in r["ports"])
        assert ingress == [("TCP", 8080), ("TCP", 8443)], ingress
        for r in np["ingress"] + np["egress"]:
            assert r.get("ports"), "every rule is limited to ports"
        egress = {(p.get("protocol", "TCP"), p["port"]) for r in np["egress"] for p in r["ports"]}
        assert egress <= {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 6443)}, egress


# --------------------------------------------------------------------------------------------
# The MutatingWebhookConfiguration
# --------------------------------------------------------------------------------------------

@case
def webhook_configuration_sorts_before_the_vault_injector(ctx):
    ours = get(ctx.renders["base"], "MutatingWebhookConfiguration")["metadata"]["name"]
    # The API server orders configurations by name, byte-wise.
    assert ours.encode() < VAULT_INJECTOR_CFG.encode(), f"{ours!r} does not sort before {VAULT_INJECTOR_CFG!r}"
    assert ours[0] == "i" and ord("i") == 0x69 < ord("v") == 0x76
    # and before the injector of any Vault release whose name starts with "vault"
    assert ours.encode() < b"vault"
    names = sorted([VAULT_INJECTOR_CFG, "istio-sidecar-injector", "istio-revision-tag-default", ours])
    assert names.index(ours) < names.index(VAULT_INJECTOR_CFG)


@case
def webhook_configuration_fields(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        mwc = get(docs, "MutatingWebhookConfiguration")
        assert len(mwc["webhooks"]) == 1
        w = mwc["webhooks"][0]
        assert len(w["name"].split(".")) >= 3
        assert w["admissionReviewVersions"] == ["v1"]
        assert w["sideEffects"] == "None"
        assert w["failurePolicy"] == "Fail"
        assert w["reinvocationPolicy"] == "Never"
        assert 1 <= w["timeoutSeconds"] <= 10
        svc = get(docs, "Service")
        assert w["clientConfig"]["service"] == {"name": svc["metadata"]["name"], "namespace": NS,
                                                "path": "/mutate", "port": 443}
        assert "url" not in w["clientConfig"]
        assert w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"], "scope": "Namespaced"}], w["rules"]
        assert w["namespaceSelector"] == {"matchLabels": INJECT_LABEL}, w["namespaceSelector"]
        assert w["matchConditions"], "only Pods that can match a profile are sent"


OPTED_IN = {"kubernetes.io/metadata.name": "istio-system", **INJECT_LABEL}
NOT_OPTED_IN = {"kubernetes.io/metadata.name": "istio-system"}


@case
def webhook_is_called_only_for_istiod_and_gateways(ctx):
    w = get(ctx.renders["base"], "MutatingWebhookConfiguration")["webhooks"][0]
    no_labels = pods.istiod()
    no_labels["metadata"].pop("labels")
    legacy_gw = pods.gateway()
    legacy_gw["metadata"]["labels"] = {"app": "istio-ingressgateway"}
    expected = [
        ("istiod", pods.istiod(), OPTED_IN, "CREATE", True),
        ("istiod canary revision", pods.istiod("canary"), OPTED_IN, "CREATE", True),
        ("ingress gateway", pods.gateway("ingressgateway"), OPTED_IN, "CREATE", True),
        ("egress gateway", pods.gateway("egressgateway"), OPTED_IN, "CREATE", True),
        ("east-west gateway (no profile by default)", pods.gateway("eastwestgateway"), OPTED_IN, "CREATE", False),
        ("legacy gateway without the istio label", legacy_gw, OPTED_IN, "CREATE", False),
        ("application Pod", pods.app_pod(), OPTED_IN, "CREATE", False),
        ("Pod without labels", pods.bare_pod(), OPTED_IN, "CREATE", False),
        ("istiod-like Pod without labels", no_labels, OPTED_IN, "CREATE", False),
        ("istiod in a namespace that did not opt in", pods.istiod(), NOT_OPTED_IN, "CREATE", False),
        ("istiod UPDATE", pods.istiod(), OPTED_IN, "UPDATE", False),
        ("istiod DELETE", pods.istiod(), OPTED_IN, "DELETE", False),
    ]
    for what, pod, ns, op, want in expected:
        got = webhook_called(w, pod, ns, op)
        assert got == want, f"{what}: webhook called={got!r}, want {want!r}"


@case
def every_shipped_profile_selector_reaches_the_webhook(ctx):
    """The fail-closed rule needs every Pod a profile can match (istiod above all) to be sent."""
    for name in RENDERS:
        docs = ctx.ours(name)
        w = get(docs, "MutatingWebhookConfiguration")["webhooks"][0]
        cfg = config_of(docs)
        profiles = cfg.get("profiles", {})
        selectors = [("istiod", (profiles.get("istiod") or {}).get("match", {"app": "istiod"}))]
        selectors += [(g["name"], g["match"]) for g in profiles.get("gateways", [])]
        for profile, match in selectors:
            pod = pods.bare_pod()
            pod["metadata"]["labels"] = dict(match)
            assert webhook_called(w, pod, OPTED_IN) is True, f"[{name}] profile {profile} {match} never reaches the webhook"


# --------------------------------------------------------------------------------------------
# The ValidatingAdmissionPolicy: istiod must be Vault-injected
# --------------------------------------------------------------------------------------------

def vap(docs):
    return get(docs, "ValidatingAdmissionPolicy"), get(docs, "ValidatingAdmissionPolicyBinding")


@case
def guard_policy_fields(ctx):
    for name in RENDERS:
        policy, binding = vap(ctx.ours(name))
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        mc = spec["matchConstraints"]
        assert mc["resourceRules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                        "resources": ["pods"], "scope": "Namespaced"}]
        assert mc["namespaceSelector"] == {"matchLabels": INJECT_LABEL}
        assert mc["objectSelector"] == {"matchLabels": {"app": "istiod"}}
        assert binding["spec"]["policyName"] == policy["metadata"]["name"]
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert "matchResources" not in binding["spec"], "the binding must not widen or narrow the policy"
        assert "paramKind" not in spec and "paramRef" not in binding["spec"]
        # keep to standard CEL + has()/in/size() and the standard macros: no Kubernetes-only
        # library functions, so both CEL implementations here evaluate the same language
        for v in spec["validations"]:
            used = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\(", v["expression"]))
            assert used <= {"has", "size", "exists", "all", "filter"}, used
            assert "\n" not in v["message"]


@case
def guard_policy_selects_what_the_istiod_profile_matches(ctx):
    for name in RENDERS:
        docs = ctx.ours(name)
        policy, _ = vap(docs)
        istiod = (config_of(docs).get("profiles") or {}).get("istiod")
        if istiod is not None:
            assert policy["spec"]["matchConstraints"]["objectSelector"]["matchLabels"] == istiod.get("match", {"app": "istiod"})


@case
def guard_policy_admits_and_refuses_the_right_pods(ctx):
    policy, binding = vap(ctx.renders["base"])
    ours_only = pods.after_istio_vault_webhook(pods.istiod())
    injected = pods.after_vault_injector(ours_only)
    no_status = copy.deepcopy(injected)
    del no_status["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"]
    status_other = copy.deepcopy(injected)
    status_other["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] = "update"
    no_init = copy.deepcopy(injected)
    no_init["spec"]["initContainers"] = [c for c in no_init["spec"]["initContainers"] if c["name"] != "vault-agent-init"]
    status_only = copy.deepcopy(pods.istiod())
    status_only["metadata"]["annotations"]["vault.hashicorp.com/agent-inject-status"] = "injected"
    no_annotations = pods.istiod()
    no_annotations["metadata"].pop("annotations")
    no_status_msg = "not injected by the Vault Agent Injector"
    not_first_msg = "first init container is not vault-agent-init"
    root_ca_dir_msg = "does not end with ROOT_CA_DIR=/vault/secrets"

    def discovery_env(pod, edit):
        pod = copy.deepcopy(pod)
        for c in pod["spec"]["containers"]:
            if c["name"] == "discovery":
                c["env"] = edit(c.get("env", []))
        return pod
    no_root_ca_dir = discovery_env(injected, lambda env: [e for e in env if e["name"] != "ROOT_CA_DIR"])
    other_root_ca_dir = discovery_env(injected, lambda env: env + [{"name": "ROOT_CA_DIR", "value": "/etc/cacerts"}])
    value_from_root_ca_dir = discovery_env(injected, lambda env: env + [
        {"name": "ROOT_CA_DIR", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    earlier_root_ca_dir = discovery_env(injected, lambda env: [{"name": "ROOT_CA_DIR", "value": "/etc/cacerts"}] + env)
    no_env = discovery_env(injected, lambda env: None)
    for c in no_env["spec"]["containers"]:
        c.pop("env", None) if c["name"] == "discovery" else None
    expected = [
        ("istiod after our webhook and the Vault injector", injected, OPTED_IN, "CREATE", None),
        ("same, with another init container after vault-agent-init",
         pods.with_init_container(injected, "istio-validation", first=False), OPTED_IN, "CREATE", None),
        ("istiod untouched (both webhooks missed it)", pods.istiod(), OPTED_IN, "CREATE", no_status_msg),
        ("istiod without annotations at all", no_annotations, OPTED_IN, "CREATE", no_status_msg),
        ("istiod with our annotations, Vault injector down", ours_only, OPTED_IN, "CREATE", no_status_msg),
        ("istiod with vault-agent-init but no status annotation", no_status, OPTED_IN, "CREATE", no_status_msg),
        ("istiod with status other than injected", status_other, OPTED_IN, "CREATE", no_status_msg),
        ("istiod injected without agent-init-first",
         pods.after_vault_injector(pods.with_init_container(ours_only, "setup"), init_first=False),
         OPTED_IN, "CREATE", not_first_msg),
        ("istiod injected, then a later webhook prepended an init container",
         pods.with_init_container(injected, "late-init", first=True), OPTED_IN, "CREATE", not_first_msg),
        ("istiod with the status annotation but no init containers", status_only, OPTED_IN, "CREATE", not_first_msg),
        ("istiod with status but no vault-agent-init", no_init, OPTED_IN, "CREATE", not_first_msg),
        ("injected istiod, a later webhook removed ROOT_CA_DIR", no_root_ca_dir, OPTED_IN, "CREATE", root_ca_dir_msg),
        ("injected istiod, a later webhook appended another ROOT_CA_DIR", other_root_ca_dir, OPTED_IN, "CREATE",
         root_ca_dir_msg),
        ("injected istiod, last ROOT_CA_DIR from valueFrom", value_from_root_ca_dir, OPTED_IN, "CREATE",
         root_ca_dir_msg),
        ("injected istiod, an earlier ROOT_CA_DIR is overridden by ours", earlier_root_ca_dir, OPTED_IN, "CREATE", None),
        ("injected istiod, discovery without env", no_env, OPTED_IN, "CREATE", root_ca_dir_msg),
        ("non-istiod Pod", pods.app_pod(), OPTED_IN, "CREATE", None),
        ("gateway Pod without injection", pods.gateway(), OPTED_IN, "CREATE", None),
        ("Pod without labels or annotations", pods.bare_pod(), OPTED_IN, "CREATE", None),
        ("istiod in a namespace that did not opt in", pods.istiod(), NOT_OPTED_IN, "CREATE", None),
        ("istiod UPDATE (only CREATE is guarded)", pods.istiod(), OPTED_IN, "UPDATE", None),
    ]
    for what, pod, ns, op, want in expected:
        verdict, msg = policy_decision(policy, binding, pod, ns, op)
        if want is None:
            assert verdict == "admitted", f"{what}: refused: {msg}"
        else:
            assert verdict == "denied", f"{what}: admitted, want refused"
            assert want in msg, f"{what}: message {msg!r} lacks {want!r}"


def fixture_pod(name):
    """Pods rendered from the Istio charts as the API server sends them (tests/fixtures/README.md)."""
    return json.loads((ROOT / f"tests/fixtures/pods/{name}.json").read_text())


@case
def admission_chain_on_chart_rendered_pods(ctx):
    """The real chain on the Istio 1.30.3 chart Pods: our webhook (the real binary's `render`
    with each shipped config), then the Vault injector (istiod-already-injected.json is its real
    output; `after_vault_injector` for the others), then the guard policy."""
    assert ctx.binary.is_file(), f"{ctx.binary} not found: build it first (cargo build), or set IVW_BIN"
    for name in ("base", "cluster1", "cluster2"):
        docs = ctx.ours(name)
        w = get(docs, "MutatingWebhookConfiguration")["webhooks"][0]
        policy, binding = vap(docs)
        for fx, called in (("istiod", True), ("istiod-canary", True), ("ingressgateway", True),
                           ("egressgateway", True), ("legacy-ingressgateway", True), ("unrelated", False)):
            got = webhook_called(w, fixture_pod(fx), OPTED_IN)
            assert got is called, f"[{name}] {fx}: webhook called={got!r}"
        for fx in ("ingressgateway", "egressgateway", "legacy-ingressgateway", "unrelated"):
            assert policy_decision(policy, binding, fixture_pod(fx), OPTED_IN)[0] == "admitted", fx
        injected = fixture_pod("istiod-already-injected")
        assert policy_decision(policy, binding, injected, OPTED_IN) == ("admitted", None)
        with tempfile.TemporaryDirectory() as tmp:
            cm = Path(tmp) / "configmap.yaml"
            cm.write_text(yaml.safe_dump(get(docs, "ConfigMap", NAME)))
            for fx in ("istiod", "istiod-canary"):
                pod = fixture_pod(fx)
                verdict, msg = policy_decision(policy, binding, pod, OPTED_IN)
                assert verdict == "denied", f"[{name}] {fx} as the chart renders it was admitted"
                p = subprocess.run([str(ctx.binary), "render", "--config", str(cm),
                                    str(ROOT / f"tests/fixtures/pods/{fx}.json")],
                                   capture_output=True, text=True, timeout=30)
                assert p.returncode == 0, f"render {fx}: {p.stderr}"
                ours = yaml.safe_load(p.stdout)
                assert ours["metadata"]["annotations"]["vault.hashicorp.com/agent-init-first"] == "true"
                verdict, msg = policy_decision(policy, binding, ours, OPTED_IN)
                assert verdict == "denied" and "not injected" in msg, \
                    f"[{name}] {fx} with our annotations but no Vault injection: {verdict}"
                final = pods.after_vault_injector(ours)
                assert policy_decision(policy, binding, final, OPTED_IN) == ("admitted", None), \
                    f"[{name}] {fx} after both webhooks was refused"


@case
def guard_expressions_never_error_on_sparse_pods(ctx):
    """An evaluation error would refuse the Pod with an opaque message; has() guards every access."""
    policy, _ = vap(ctx.renders["base"])
    sparse = [pods.bare_pod(), {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": []}},
              {"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": {}}, "spec": {"initContainers": [], "containers": []}}]
    w = get(ctx.renders["base"], "MutatingWebhookConfiguration")["webhooks"][0]
    exprs = [v["expression"] for v in policy["spec"]["validations"]] + [m["expression"] for m in w["matchConditions"]]
    for pod in sparse:
        for e in exprs:
            out = CEL.eval(e, {"object": pod})
            assert out in (True, False), f"{e!r} on {pod['metadata']}: {out!r}"


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

@case
def cert_manager_component(ctx):
    docs, base = ctx.ours("cert-manager"), ctx.ours("cluster1")
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds, "no cluster access without caBundle upkeep"
    c = container(docs)
    args, base_args = c["args"], container(base)["args"]
    assert "--tls-self-signed" not in args and flag(args, "--webhook-config") is None
    rest = [a for a in args if not a.startswith(("--tls-cert=", "--tls-key="))]
    assert rest == [a for a in base_args if a != "--tls-self-signed" and not a.startswith("--webhook-config=")], \
        "the component changes only the TLS flags"
    mount = {m["name"]: m for m in c["volumeMounts"]}["tls"]
    assert mount["readOnly"] is True
    assert flag(args, "--tls-cert") == mount["mountPath"] + "/tls.crt"
    assert flag(args, "--tls-key") == mount["mountPath"] + "/tls.key"
    vol = {v["name"]: v for v in get(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}["tls"]["secret"]
    assert vol["defaultMode"] & 0o007 == 0, "the key is not world-readable"
    certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    leaf = [cert for cert in certs.values() if cert["spec"]["secretName"] == vol["secretName"]]
    assert len(leaf) == 1, "the mounted Secret is a Certificate's"
    leaf = leaf[0]
    svc = get(docs, "Service")["metadata"]["name"]
    assert f"{svc}.{NS}.svc" in leaf["spec"]["dnsNames"], "the API server verifies <service>.<namespace>.svc"
    assert not leaf["spec"].get("isCA")
    ca_issuer = issuers[leaf["spec"]["issuerRef"]["name"]]
    ca_cert = [cert for cert in certs.values() if cert["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"]]
    assert len(ca_cert) == 1 and ca_cert[0]["spec"]["isCA"] is True, "the leaf is issued by a private CA"
    assert "selfSigned" in issuers[ca_cert[0]["spec"]["issuerRef"]["name"]]["spec"]
    mwc = get(docs, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NS}/{leaf['metadata']['name']}"
    assert_pss_restricted(get(docs, "Deployment")["spec"]["template"]["spec"], "[cert-manager]")


@case
def reinvocation_component_is_a_minimal_partial_object(ctx):
    docs = ctx.renders["reinvocation"]
    partial = get(docs, "MutatingWebhookConfiguration", VAULT_INJECTOR_CFG)
    assert partial == {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                       "metadata": {"name": VAULT_INJECTOR_CFG},
                       "webhooks": [{"name": "vault.hashicorp.com", "reinvocationPolicy": "IfNeeded"}]}, partial
    # everything else is the overlay, unchanged
    rest = sorted(json.dumps(d, sort_keys=True) for d in ctx.ours("reinvocation"))
    assert rest == sorted(json.dumps(d, sort_keys=True) for d in ctx.renders["cluster2"])


@case
def reinvocation_component_merges_into_the_vault_charts_object(ctx):
    """Server-side apply and strategic merge both key the webhooks list by name: the merged object
    is the chart's with one field added, and still valid."""
    partial = get(ctx.renders["reinvocation"], "MutatingWebhookConfiguration", VAULT_INJECTOR_CFG)
    live = yaml.safe_load((ROOT / "tests/manifests/fixtures/vault-agent-injector-cfg.yaml").read_text())
    assert not [e for v in K8S_VERSIONS for e in strict_errors(live, v)], "fixture invalid"
    merged = copy.deepcopy(live)
    by_name = {w["name"]: w for w in merged["webhooks"]}
    for w in partial["webhooks"]:
        assert w["name"] in by_name, f"webhook {w['name']} not in the Vault chart's configuration"
        by_name[w["name"]].update(w)
    errors = [e for v in K8S_VERSIONS for e in strict_errors(merged, v)]
    assert not errors, errors
    expect = copy.deepcopy(live)
    expect["webhooks"][0]["reinvocationPolicy"] = "IfNeeded"
    assert merged == expect


# --------------------------------------------------------------------------------------------
# The shipped configuration, and the Vault side that must match it
# --------------------------------------------------------------------------------------------

def shipped_configmap_files():
    return [ROOT / "manifests/base/configmap.yaml",
            ROOT / "manifests/overlays/cluster1/configmap.yaml",
            ROOT / "manifests/overlays/cluster2/configmap.yaml"]


@case
def overlays_carry_their_clusters_vault_paths(ctx):
    for n in (1, 2):
        cfg = config_of(ctx.renders[f"cluster{n}"])
        assert cfg["cluster"] == f"cluster{n}"
        assert cfg["vault"]["authPath"] == f"auth/kubernetes-cluster{n}"
        assert cfg["vault"].get("kvVersion", 1) == 1
        istiod = cfg["profiles"]["istiod"]
        assert istiod["role"] == "istiod"
        assert istiod["secretPath"] == f"kubernetes-cluster{n}-secrets/istiod-service/certs"
        for g in cfg["profiles"].get("gateways", []):
            assert g["secretPath"].startswith(f"kubernetes-cluster{n}-secrets/"), g
        other = 3 - n
        assert f"cluster{other}" not in json.dumps(cfg), f"cluster{n}'s config mentions cluster{other}"


def hcl_read_paths(path):
    """The paths a policy file grants "read" on (the small HCL subset our policies use)."""
    text = path.read_text()
    blocks = re.findall(r'path\s+"([^"]+)"\s*\{([^}]*)\}', text)
    assert blocks, f"{path}: no path blocks"
    out = {}
    for p, body in blocks:
        caps = re.search(r"capabilities\s*=\s*\[([^\]]*)\]", body)
        out[p] = sorted(c.strip().strip('"') for c in caps.group(1).split(",") if c.strip())
    return out


@case
def vault_policies_grant_exactly_the_configured_paths(ctx):
    setup = (ROOT / "manifests/vault/setup.sh").read_text()
    for n in (1, 2):
        cfg = config_of(ctx.renders[f"cluster{n}"])
        d = ROOT / f"manifests/vault/cluster{n}"
        istiod = hcl_read_paths(d / "istiod.hcl")
        assert istiod == {cfg["profiles"]["istiod"]["secretPath"]: ["read"]}, istiod
        gw = hcl_read_paths(d / "ingressgateway.hcl")
        assert gw == {g["secretPath"]: ["read"] for g in cfg["profiles"]["gateways"]}, gw
        for role in [cfg["profiles"]["istiod"]["role"]] + [g["role"] for g in cfg["profiles"]["gateways"]]:
            assert f'auth_mount/role/{role}"' in setup, f"setup.sh creates no role {role}"
        assert 'auth_mount=kubernetes-$cluster' in setup and cfg["vault"]["authPath"] == f"auth/kubernetes-cluster{n}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@case
def vault_setup_runs_against_a_real_server(ctx):
    """manifests/vault/setup.sh against `bao server -dev` on loopback: mounts, policies and roles
    exist as the overlays expect; each cluster's istiod token reads its own CA and nothing else;
    the CA bytes come back unchanged; a second run is harmless; a KV v2 mount is refused.
    setup.sh drives the real CLI; the checks read the server's HTTP API directly."""
    bao = shutil.which("bao")
    assert bao, "bao not found: run scripts/install-manifest-tools"
    tmp = Path(tempfile.mkdtemp(prefix="ivw-bao-"))
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HOME": str(tmp), "VAULT_CLI": bao, "VAULT_ADDR": addr, "VAULT_TOKEN": "root",
           "BAO_ADDR": addr, "BAO_TOKEN": "root", "KUBERNETES_HOST": "https://203.0.113.10:6443"}

    def api(method, path, body=None, token="root"):
        req = urllib.request.Request(f"{addr}/v1/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-Vault-Token": token})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def setup(*args, extra=None, script=ROOT / "manifests/vault/setup.sh"):
        return subprocess.run([str(script), *args], env={**env, **(extra or {})},
                              capture_output=True, text=True, timeout=120)

    server = subprocess.Popen([bao, "server", "-dev", "-dev-root-token-id=root",
                               f"-dev-listen-address=127.0.0.1:{port}"],
                              env=env, stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            try:
                if api("GET", "sys/health").get("initialized"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline and server.poll() is None, (tmp / "server.log").read_text()[-2000:]
            time.sleep(0.2)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(tmp / "k.pem"), "-out", str(tmp / "ca.crt"), "-days", "1",
                        "-subj", "/CN=kube-ca"], check=True, capture_output=True)
        env["KUBERNETES_CA_CERT"] = str(tmp / "ca.crt")
        for n in (1, 2):
            ca = tmp / f"ca{n}"
            ca.mkdir()
            # distinct bytes per cluster, with and without a trailing newline
            for f in ("ca-key.pem", "ca-cert.pem", "root-cert.pem"):
                (ca / f).write_bytes(f"-----BEGIN {f} cluster{n}-----\nAAAA\n-----END-----\n".encode())
            (ca / "cert-chain.pem").write_bytes(f"intermediate{n}\nroot".encode())
            p = setup(f"cluster{n}", extra={"ISTIOD_CA_DIR": str(ca)})
            assert p.returncode == 0, f"setup.sh cluster{n}: {p.stdout}{p.stderr}"
        p = setup("cluster1")
        assert p.returncode == 0, f"setup.sh cluster1 (second run): {p.stderr}"
        for n in (1, 2):
            cfg = config_of(ctx.renders[f"cluster{n}"])
            istiod = cfg["profiles"]["istiod"]
            mount = istiod["secretPath"].split("/")[0]
            m = api("GET", f"sys/mounts/{mount}")["data"]
            assert m["type"] == "kv" and m["options"]["version"] == str(cfg["vault"].get("kvVersion", 1)), m
            auth = cfg["vault"]["authPath"]
            assert api("GET", f"sys/{auth}")["data"]["type"] == "kubernetes"
            role = api("GET", f"{auth}/role/{istiod['role']}")["data"]
            assert role["bound_service_account_names"] == ["istiod"], role
            assert role["bound_service_account_namespaces"] == ["istio-system"], role
            assert role["token_policies"] == [f"cluster{n}-istiod"], role
            for g in cfg["profiles"]["gateways"]:
                gr = api("GET", f"{auth}/role/{g['role']}")["data"]
                assert gr["token_policies"] == [f"cluster{n}-ingressgateway"], gr
            token = api("POST", "auth/token/create", {"policies": [f"cluster{n}-istiod"]})["auth"]["client_token"]
            own = istiod["secretPath"]
            other = config_of(ctx.renders[f"cluster{3 - n}"])["profiles"]["istiod"]["secretPath"]
            gw = cfg["profiles"]["gateways"][0]["secretPath"]
            caps = api("POST", "sys/capabilities", {"token": token, "paths": [own, other, gw]})
            for path, want in ((own, ["read"]), (other, ["deny"]), (gw, ["deny"])):
                assert caps[path] == want, f"cluster{n}-istiod on {path}: {caps[path]}, want {want}"
            data = api("GET", own, token=token)["data"]
            # the files' keys, and `ttl` (SECRET_TTL, default 1h): KV v1's re-read interval
            assert set(data) == set(istiod["files"].values()) | {"ttl"}, data.keys()
            assert data["ttl"] == "1h", data["ttl"]
            for f, key in istiod["files"].items():
                assert data[key].encode() == (tmp / f"ca{n}" / f).read_bytes(), f"{key} changed on the way into Vault"
        # a KV v2 mount where the config says v1 is refused, not silently misused
        v2 = tmp / "vault"
        shutil.copytree(ROOT / "manifests/vault", v2)
        shutil.copytree(v2 / "cluster1", v2 / "cluster9")
        api("POST", "sys/mounts/kubernetes-cluster9-secrets", {"type": "kv", "options": {"version": "2"}})
        p = setup("cluster9", script=v2 / "setup.sh")
        assert p.returncode != 0 and "version 2" in p.stderr, (p.returncode, p.stderr)
        assert setup("Bad_Name").returncode == 2, "a cluster name that is not a DNS label is refused"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


@case
def istio_vault_webhook_check_accepts_every_shipped_configmap(ctx):
    assert ctx.binary.is_file() and os.access(ctx.binary, os.X_OK), \
        f"{ctx.binary} not found: build it first (cargo build), or set IVW_BIN"
    tmp = Path(tempfile.mkdtemp(prefix="ivw-check-"))
    try:
        files = list(shipped_configmap_files())
        for name in RENDERS:
            f = tmp / f"{name}-configmap.yaml"
            f.write_text(yaml.safe_dump(get(ctx.ours(name), "ConfigMap", NAME)))
            files.append(f)
        for f in files:
            p = subprocess.run([str(ctx.binary), "check", str(f)], capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, f"check {f}: exit {p.returncode}\n{p.stderr}"
        # negative control: `check` really validates (a typo is an error naming the field)
        cm = get(ctx.renders["cluster1"], "ConfigMap", NAME)
        bad = copy.deepcopy(cm)
        bad["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("secretPath:", "secretPth:", 1)
        f = tmp / "typo-configmap.yaml"
        f.write_text(yaml.safe_dump(bad))
        p = subprocess.run([str(ctx.binary), "check", str(f)], capture_output=True, text=True, timeout=30)
        assert p.returncode == 1, f"check accepted a ConfigMap with a typo (exit {p.returncode})"
        assert "secretPth" in p.stderr, f"the error does not name the field: {p.stderr!r}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Image and scripts
# --------------------------------------------------------------------------------------------

@case
def dockerfile_is_pinned_minimal_and_nonroot(ctx):
    text = (ROOT / "Dockerfile").read_text()
    lines = [l for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.lstrip().startswith("#")]
    froms = [l.split()[1] for l in lines if l.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    for image in froms:
        assert re.fullmatch(r"[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}", image), f"not pinned by tag and digest: {image}"
    assert froms[0].split("@")[0].endswith("-bookworm") and "debian12" in froms[-1], \
        "builder and runtime are the same Debian release (the binary links glibc dynamically)"
    assert froms[-1].startswith("gcr.io/distroless/cc-debian12:nonroot@")
    assert any("cargo build --release --locked" in l for l in lines if l.startswith("RUN "))
    final = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
    user = [l.split()[1] for l in final if l.startswith("USER ")]
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), f"final USER {user}"
    copies = [l for l in final if l.startswith("COPY ")]
    assert len(copies) == 1 and "--from=build" in copies[0], "the final stage holds the binary and nothing else"
    dest = copies[0].split()[-1]
    assert json.loads(next(l for l in final if l.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])[0] == dest
    for label in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in text, f"OCI label {label}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", "target", ".tools"):
        assert entry in ignore, f".dockerignore misses {entry}"


@case
def shell_scripts_pass_shellcheck(ctx):
    sc = shutil.which("shellcheck")
    assert sc, "shellcheck not found: run scripts/install-manifest-tools"
    scripts = [ROOT / "manifests/vault/setup.sh", ROOT / "scripts/test-manifests",
               ROOT / "scripts/install-manifest-tools"]
    p = subprocess.run([sc, "--severity=warning", *map(str, scripts)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@case
def chart_passes_helm_lint_strict(ctx):
    p = subprocess.run([ctx.helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@case
def chart_renders_the_same_objects_as_kustomize(ctx):
    """One source of truth: for the same settings the chart and the kustomize base (with the
    overlays and the cert-manager component) render the same objects, field for field."""
    for name in chart_values(ctx):
        want = normalized(ctx.ours(name))
        got = normalized(ctx.renders[f"chart:{name}"])
        assert sorted(got) == sorted(want), f"[{name}] objects differ: chart {sorted(got)}, kustomize {sorted(want)}"
        for key in want:
            assert got[key] == want[key], (
                f"[{name}] {key} differs:\n chart:     {json.dumps(got[key], sort_keys=True)}\n"
                f" kustomize: {json.dumps(want[key], sort_keys=True)}")


@case
def chart_generates_match_conditions_and_guard_from_the_profiles(ctx):
    """A gateway profile with a new selector reaches the webhook without a hand edit, and the
    guard follows the istiod profile's selector, container and secret volume path."""
    cfg = copy.deepcopy(chart_values(ctx)["cluster1"]["config"])
    cfg["profiles"]["gateways"].append({"name": "internal", "match": {"app": "internal-gw"},
                                        "role": "internal-gw", "secretPath": "kv/internal",
                                        "files": {"tls.crt": "crt", "tls.key": "key"}})
    cfg["profiles"]["istiod"].update({"match": {"app": "istiod", "istio.io/rev": "canary"},
                                      "container": "pilot"})
    cfg["secretVolumePath"] = "/vault/ca"
    docs = helm_template(ctx, {"config": cfg})
    w = get(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    gw = pods.bare_pod()
    gw["metadata"]["labels"] = {"app": "internal-gw"}
    assert webhook_called(w, gw, OPTED_IN) is True, "the new gateway profile does not reach the webhook"
    assert webhook_called(w, pods.app_pod(), OPTED_IN) is False
    assert webhook_called(w, pods.istiod(), OPTED_IN) is True
    policy, binding = vap(docs)
    assert policy["spec"]["matchConstraints"]["objectSelector"] == {
        "matchLabels": {"app": "istiod", "istio.io/rev": "canary"}}
    last = policy["spec"]["validations"][-1]
    assert "c.name == 'pilot'" in last["expression"] and "'/vault/ca'" in last["expression"], last
    for d in docs:
        if not d["apiVersion"].startswith("cert-manager.io/"):
            for v in K8S_VERSIONS:
                assert not strict_errors(d, v), strict_errors(d, v)


@case
def chart_refuses_a_bad_config_before_install(ctx):
    """values.schema.json and the chart's own checks refuse, with the field named, what
    `istio-vault-webhook check` refuses."""
    good = chart_values(ctx)["cluster1"]["config"]

    def with_(edit):
        cfg = copy.deepcopy(good)
        edit(cfg)
        return {"config": cfg}
    bad = [
        # null, not absent: Helm merges the given values over the chart's defaults
        ("missing cluster", with_(lambda c: c.update(cluster=None)), "missing property 'cluster'"),
        ("kvVersion 3", with_(lambda c: c["vault"].update(kvVersion=3)), "/config/vault/kvVersion"),
        ("a typo", with_(lambda c: c["vault"].update(authpath="x")), "additional properties 'authpath'"),
        ("partial istiod layout", with_(lambda c: c["profiles"]["istiod"]["files"].pop("cert-chain.pem")),
         "/config/profiles/istiod/files"),
        ("file- prefix", with_(lambda c: c["profiles"]["gateways"][0]["files"].update({"file-x": "k"})),
         "invalid propertyName 'file-x'"),
        ("renderInterval with init-only",
         with_(lambda c: c["profiles"]["istiod"].update(rotation="init-only", renderInterval="1m")),
         "/config/profiles/istiod"),
        ("renderInterval without a unit", with_(lambda c: c["profiles"]["istiod"].update(renderInterval="30")),
         "/config/profiles/istiod/renderInterval"),
        ("renderInterval on KV v1", with_(lambda c: c["profiles"]["istiod"].update(renderInterval="1m")),
         "has no effect with vault.kvVersion 1"),
        ("gateway name not a DNS label", with_(lambda c: c["profiles"]["gateways"][0].update(name="Ingress")),
         "/config/profiles/gateways/0/name"),
        ("duplicate selector", with_(lambda c: c["profiles"]["gateways"].append(
            dict(c["profiles"]["gateways"][0], name="second"))), "same selector"),
        ("duplicate name", with_(lambda c: c["profiles"]["gateways"].append(
            dict(c["profiles"]["gateways"][0], match={"istio": "other"}))), "is used twice"),
        ("webhook sorts after the injector", {"config": good, "webhook": {"name": "zz-ivw"}},
         "does not sort before the Vault injector"),
    ]
    for what, values, needle in bad:
        err = helm_template(ctx, values, expect_error=True)
        assert needle in err, f"{what}: {err}"
        # and the webhook's own check agrees that the config is bad (the webhook-name case is a
        # chart setting, not config)
        if "config" in values and values["config"] is not good:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                yaml.safe_dump({k: v for k, v in values["config"].items() if v is not None}, f)
                f.flush()
                p = subprocess.run([str(ctx.binary), "check", f.name], capture_output=True, text=True)
            assert p.returncode == 1, f"{what}: istio-vault-webhook check accepted it"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rendered", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--helm", required=True)
    args = ap.parse_args()
    ctx = Ctx(args.rendered, args.bin, args.helm)
    passed = failed = 0
    for fn in CASES:
        t = time.monotonic()
        try:
            fn(ctx)
        except Exception as e:  # report every failure, keep going
            failed += 1
            if isinstance(e, AssertionError) and str(e):
                detail = str(e)
            elif isinstance(e, AssertionError):  # a bare assert: show its line
                frame = traceback.extract_tb(e.__traceback__)[-1]
                detail = f"line {frame.lineno}: {frame.line}"
            else:
                detail = traceback.format_exc()
            print(f"FAIL {fn.__name__}: {detail}")
        else:
            passed += 1
            print(f"ok   {fn.__name__} ({time.monotonic() - t:.2f}s)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
