//! istio-vault-webhook: a mutating admission webhook that makes istiod and
//! Istio gateways read their CA from Vault through the Vault Agent Injector.
//!
//! The request path reads top to bottom: `server` receives bytes,
//! `admission` reads the review (with `json`, into a `pod::PodView`),
//! `mutate` decides (using `config` and `patch`), `admission` writes the
//! response (with `json`'s writer). docs/design.md walks the same path and
//! says why each rule exists. Everything but `server`,
//! `source` and `tls` is pure.

pub mod admission;
pub mod backoff;
pub mod certs;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod export;
pub mod json;
pub mod metrics;
pub mod mutate;
pub mod patch;
pub mod pod;
pub mod render;
pub mod server;
pub mod source;
pub mod tls;
