# Policy cluster1-ingressgateway: the ingress gateway's serving certificate in cluster1
# (tls_crt, tls_key, ca_crt). It cannot read the mesh CA key.
path "kubernetes-cluster1-secrets/ingressgateway/certs" {
  capabilities = ["read"]
}
