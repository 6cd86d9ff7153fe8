#!/usr/bin/env bash
# The Vault side of one cluster, matching manifests/overlays/<CLUSTER>:
#
#   KV v1 secrets engine   kubernetes-<CLUSTER>-secrets/
#   Kubernetes auth mount  auth/kubernetes-<CLUSTER>
#   policies               <CLUSTER>-istiod, <CLUSTER>-ingressgateway  (vault/<CLUSTER>/*.hcl)
#   roles                  istiod, istio-ingressgateway                 (on that auth mount)
#
# Usage:  manifests/vault/setup.sh CLUSTER
# Safe to run again: mounts are created only when missing; config, policies and roles are
# (re)written. Works with the vault CLI or OpenBao's bao (VAULT_CLI=bao).
#
# Environment:
#   VAULT_ADDR, VAULT_TOKEN, ...  as for the CLI; the token must manage mounts, auth and policies
#   KUBERNETES_HOST               required: this cluster's API server URL, as Vault reaches it
#   KUBERNETES_CA_CERT            required: file with this cluster's API server CA (PEM)
#   TOKEN_REVIEWER_JWT            file with the JWT Vault uses to call TokenReview (see
#                                 token-reviewer.yaml). Unset: Vault reviews each login with the
#                                 logging-in Pod's own JWT, which then needs system:auth-delegator.
#   ISTIOD_SERVICE_ACCOUNTS       default istiod                  (a revisioned istiod: istiod-<rev>)
#   ISTIOD_NAMESPACES             default istio-system
#   GATEWAY_SERVICE_ACCOUNTS      default istio-ingressgateway    (your gateway release's SA)
#   GATEWAY_NAMESPACES            default istio-ingress,istio-system
#   ISTIOD_CA_DIR                 optional: a directory holding ca-key.pem, ca-cert.pem,
#                                 root-cert.pem, cert-chain.pem for THIS cluster's intermediate;
#                                 stored byte for byte at <mount>/istiod-service/certs
#   GATEWAY_TLS_DIR               optional: tls.crt, tls.key, ca.crt; stored at
#                                 <mount>/ingressgateway/certs
#   SECRET_TTL                    default 1h: stored as the `ttl` key beside the files. On KV v1
#                                 it is how often the Vault agent sidecar re-reads the secret
#                                 (about 90% of it; without it: the mount's lease TTL, 768h by
#                                 default, so a rotated intermediate would take a month to
#                                 arrive). The templates read only their own keys. Empty: none.
#   VAULT_CLI                     default vault
set -euo pipefail

cluster=${1:?usage: $0 CLUSTER   (e.g. cluster1)}
case $cluster in
  *[!a-z0-9-]* | -* | *-) echo "CLUSTER must be a DNS label, got '$cluster'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
policies=$here/$cluster
[ -d "$policies" ] || { echo "no policy directory $policies (copy vault/cluster1 and edit it)" >&2; exit 2; }
: "${KUBERNETES_HOST:?set KUBERNETES_HOST to the API server URL of the cluster}"
: "${KUBERNETES_CA_CERT:?set KUBERNETES_CA_CERT to a file with the API server CA}"
cli=${VAULT_CLI:-vault}

kv_mount=kubernetes-$cluster-secrets
auth_mount=kubernetes-$cluster

# KV version 1, as the ConfigMaps' kvVersion: 1. An existing mount of another version would make
# every template read the wrong path: refuse instead of guessing.
if mount=$("$cli" read -format=json "sys/mounts/$kv_mount" 2>/dev/null); then
  if ! tr -d ' \n' <<<"$mount" | grep -q '"type":"kv"'; then
    echo "$kv_mount/ exists and is not a KV secrets engine" >&2; exit 1
  fi
  if tr -d ' \n' <<<"$mount" | grep -q '"version":"2"'; then
    echo "$kv_mount/ is KV version 2; set kvVersion: 2 in the ConfigMap and use .../data/... paths in the policies" >&2
    exit 1
  fi
else
  "$cli" secrets enable -path="$kv_mount" -version=1 -description="Istio CA material for $cluster" kv
fi

if ! "$cli" read "sys/auth/$auth_mount" >/dev/null 2>&1; then
  "$cli" auth enable -path="$auth_mount" -description="Kubernetes auth for $cluster" kubernetes
fi
reviewer=()
if [ -n "${TOKEN_REVIEWER_JWT:-}" ]; then
  reviewer=(token_reviewer_jwt=@"$TOKEN_REVIEWER_JWT")
fi
"$cli" write "auth/$auth_mount/config" \
  kubernetes_host="$KUBERNETES_HOST" \
  kubernetes_ca_cert=@"$KUBERNETES_CA_CERT" \
  "${reviewer[@]}"

"$cli" policy write "$cluster-istiod" "$policies/istiod.hcl"
"$cli" policy write "$cluster-ingressgateway" "$policies/ingressgateway.hcl"

# Short-lived tokens: the agent re-authenticates with the Pod's ServiceAccount token.
"$cli" write "auth/$auth_mount/role/istiod" \
  bound_service_account_names="${ISTIOD_SERVICE_ACCOUNTS:-istiod}" \
  bound_service_account_namespaces="${ISTIOD_NAMESPACES:-istio-system}" \
  token_policies="$cluster-istiod" \
  token_ttl=1h token_max_ttl=24h
"$cli" write "auth/$auth_mount/role/istio-ingressgateway" \
  bound_service_account_names="${GATEWAY_SERVICE_ACCOUNTS:-istio-ingressgateway}" \
  bound_service_account_namespaces="${GATEWAY_NAMESPACES:-istio-ingress,istio-system}" \
  token_policies="$cluster-ingressgateway" \
  token_ttl=1h token_max_ttl=24h

# Key names are the ones the ConfigMaps' `files` map reads. `@file` stores the bytes unchanged,
# and the webhook's templates render them unchanged.
ttl=()
if [ -n "${SECRET_TTL-1h}" ]; then
  ttl=(ttl="${SECRET_TTL-1h}")
fi
if [ -n "${ISTIOD_CA_DIR:-}" ]; then
  "$cli" write "$kv_mount/istiod-service/certs" \
    ca_key=@"$ISTIOD_CA_DIR/ca-key.pem" \
    ca_cert=@"$ISTIOD_CA_DIR/ca-cert.pem" \
    root_cert=@"$ISTIOD_CA_DIR/root-cert.pem" \
    cert_chain=@"$ISTIOD_CA_DIR/cert-chain.pem" "${ttl[@]}" >/dev/null
  echo "stored $kv_mount/istiod-service/certs"
fi
if [ -n "${GATEWAY_TLS_DIR:-}" ]; then
  "$cli" write "$kv_mount/ingressgateway/certs" \
    tls_crt=@"$GATEWAY_TLS_DIR/tls.crt" \
    tls_key=@"$GATEWAY_TLS_DIR/tls.key" \
    ca_crt=@"$GATEWAY_TLS_DIR/ca.crt" "${ttl[@]}" >/dev/null
  echo "stored $kv_mount/ingressgateway/certs"
fi
echo "Vault is set up for $cluster: auth/$auth_mount, $kv_mount/"
