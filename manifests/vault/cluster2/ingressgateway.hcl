# Policy cluster2-ingressgateway: the ingress gateway's serving certificate in cluster2
# (tls_crt, tls_key, ca_crt). It cannot read the mesh CA key.
path "kubernetes-cluster2-secrets/ingressgateway/certs" {
  capabilities = ["read"]
}
