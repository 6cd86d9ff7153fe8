"""Pods as the API server sees them at admission, for the CEL tests.

`istiod()` is shaped like the Pod Istio's upstream istiod chart creates (labels `app: istiod`,
`istio.io/rev`, container `discovery`, `sidecar.istio.io/inject: "false"`). The helpers below
apply, by hand, what each mutating webhook does to it, so a test reads as the admission chain:
istiod() -> after_istio_vault_webhook() -> after_vault_injector() -> the guard policy.
"""

import copy

VAULT = "vault.hashicorp.com/"


def istiod(rev="default"):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "istiod-5d7c8b9f6d-",
            "namespace": "istio-system",
            "labels": {
                "app": "istiod",
                "istio": "pilot",
                "istio.io/rev": rev,
                "install.operator.istio.io/owning-resource": "unknown",
                "operator.istio.io/component": "Pilot",
                "sidecar.istio.io/inject": "false",
                "pod-template-hash": "5d7c8b9f6d",
            },
            "annotations": {
                "prometheus.io/port": "15014",
                "prometheus.io/scrape": "true",
                "sidecar.istio.io/inject": "false",
            },
        },
        "spec": {
            "serviceAccountName": "istiod",
            "containers": [
                {
                    "name": "discovery",
                    "image": "docker.io/istio/pilot:1.28.0",
                    "args": ["discovery", "--monitoringAddr=:15014", "--log_output_level=default:info"],
                    "env": [
                        {"name": "REVISION", "value": rev},
                        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    ],
                    "ports": [
                        {"containerPort": 8080, "protocol": "TCP"},
                        {"containerPort": 15010, "protocol": "TCP"},
                        {"containerPort": 15017, "protocol": "TCP"},
                    ],
                    "volumeMounts": [
                        {"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "cacerts", "secret": {"secretName": "cacerts", "optional": True}},
            ],
        },
    }


def gateway(kind="ingressgateway"):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"istio-{kind}-6b9d7c-",
            "namespace": "istio-ingress",
            "labels": {"app": f"istio-{kind}", "istio": kind, "sidecar.istio.io/inject": "true"},
            "annotations": {"inject.istio.io/templates": "gateway"},
        },
        "spec": {"containers": [{"name": "istio-proxy", "image": "auto"}]},
    }


def app_pod():
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "reviews-v1-", "namespace": "istio-system",
                     "labels": {"app": "reviews", "version": "v1"}},
        "spec": {"containers": [{"name": "reviews", "image": "reviews:1"}]},
    }


def bare_pod():
    """No labels, no annotations, no init containers: nothing optional is present."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare", "namespace": "istio-system"},
            "spec": {"containers": [{"name": "c", "image": "c:1"}]}}


def after_istio_vault_webhook(pod, secret_volume_path="/vault/secrets"):
    """The annotations and env var docs/design.md says our webhook leaves on an istiod Pod."""
    pod = copy.deepcopy(pod)
    ann = pod["metadata"].setdefault("annotations", {})
    ann.update({
        VAULT + "agent-inject": "true",
        VAULT + "agent-init-first": "true",
        VAULT + "role": "istiod",
        VAULT + "auth-path": "auth/kubernetes-cluster1",
        "istio-vault-webhook/profile": "istiod",
        "istio-vault-webhook/config-hash": "sha256:0123456789abcdef",
    })
    for f, k in [("ca-key.pem", "ca_key"), ("ca-cert.pem", "ca_cert"),
                 ("root-cert.pem", "root_cert"), ("cert-chain.pem", "cert_chain")]:
        p = "kubernetes-cluster1-secrets/istiod-service/certs"
        ann[VAULT + "agent-inject-secret-" + f] = p
        ann[VAULT + "agent-inject-template-" + f] = (
            '{{- with secret "%s" -}}{{ .Data.%s }}{{- end -}}' % (p, k))
    for c in pod["spec"]["containers"]:
        if c["name"] == "discovery":
            c.setdefault("env", []).append({"name": "ROOT_CA_DIR", "value": secret_volume_path})
    return pod


def after_vault_injector(pod, init_first=True):
    """What vault-k8s adds: status annotation, vault-agent-init (first when agent-init-first),
    the vault-agent sidecar and the in-memory secrets volume mounted in every container."""
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("annotations", {})[VAULT + "agent-inject-status"] = "injected"
    mount = {"name": "vault-secrets", "mountPath": "/vault/secrets"}
    for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        c.setdefault("volumeMounts", []).append(dict(mount))
    init = {"name": "vault-agent-init", "image": "hashicorp/vault:1.20.0",
            "args": ["echo ${VAULT_CONFIG?} | base64 -d > /home/vault/config.json && vault agent -config=/home/vault/config.json"],
            "volumeMounts": [dict(mount), {"name": "home-init", "mountPath": "/home/vault"}]}
    inits = pod["spec"].setdefault("initContainers", [])
    if init_first:
        inits.insert(0, init)
    else:
        inits.append(init)
    pod["spec"]["containers"].append(
        {"name": "vault-agent", "image": "hashicorp/vault:1.20.0",
         "volumeMounts": [dict(mount), {"name": "home-sidecar", "mountPath": "/home/vault"}]})
    pod["spec"].setdefault("volumes", []).extend([
        {"name": "home-init", "emptyDir": {"medium": "Memory"}},
        {"name": "home-sidecar", "emptyDir": {"medium": "Memory"}},
        {"name": "vault-secrets", "emptyDir": {"medium": "Memory"}},
    ])
    return pod


def with_init_container(pod, name, first=True):
    """Another webhook (or the chart) adding an init container."""
    pod = copy.deepcopy(pod)
    inits = pod["spec"].setdefault("initContainers", [])
    c = {"name": name, "image": f"{name}:1"}
    if first:
        inits.insert(0, c)
    else:
        inits.append(c)
    return pod
