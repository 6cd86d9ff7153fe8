# Policy cluster1-istiod: what istiod's Vault Agent in cluster1 may do, and nothing else.
# Read this cluster's intermediate CA (KV v1 mount kubernetes-cluster1-secrets): ca_key, ca_cert,
# root_cert, cert_chain. No list, no write, no access to any other cluster's CA.
# (With a KV v2 mount, set kvVersion: 2 in the ConfigMap and use the path
#  kubernetes-cluster1-secrets/data/istiod-service/certs here.)
path "kubernetes-cluster1-secrets/istiod-service/certs" {
  capabilities = ["read"]
}
