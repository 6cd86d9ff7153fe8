//! `doctor`: looks at a live cluster and says, one line per check, whether istiod and the Istio
//! gateways will get their CA from Vault through this webhook and the Vault Agent Injector —
//! and, when not, how to fix it.
//!
//! Exit codes: 0 every check passed; 1 a check failed (including a permission the doctor lacks
//! for one check: that check fails naming the verb and resource); 2 the cluster could not be
//! reached at all (no credentials, bad context, API server not answering or refusing them).
//! Checks that depend on a failed one (e.g. the failurePolicy of a configuration that does not
//! exist) are not printed.

mod cel;
mod probe;
mod selector;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{Config, keys};
use selector::Labels;

/// The opt-in label of SPEC §2, used when our configuration cannot be read.
const OPT_IN: (&str, &str) = ("istio-vault-webhook/inject", "enabled");

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// kubeconfig file. Default: $KUBECONFIG, ~/.kube/config, else in-cluster credentials.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context. Default: the current context.
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace the webhook runs in.
    #[arg(long, default_value = "istio-vault-webhook")]
    pub namespace: String,
    /// The ConfigMap holding config.yaml: NAME (in --namespace) or NAMESPACE/NAME.
    #[arg(
        long,
        value_name = "[NAMESPACE/]NAME",
        default_value = "istio-vault-webhook"
    )]
    pub config_map: String,
    /// Our MutatingWebhookConfiguration.
    #[arg(long, value_name = "NAME", default_value = "istio-vault-webhook")]
    pub webhook_config: String,
    /// The Vault Agent Injector's MutatingWebhookConfiguration. Default: found by its webhook
    /// name (vault.hashicorp.com), a name containing agent-injector, or its Service.
    #[arg(long, value_name = "NAME")]
    pub injector_config: Option<String>,
    /// The guard ValidatingAdmissionPolicy (and the binding naming it).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "istio-vault-webhook-istiod-requires-vault"
    )]
    pub guard_policy: String,
    /// text: one ✔/✘ line per check; json: an array of {check, ok, message, fix}.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Timeout of each API request and of the TLS probe of the webhook.
    #[arg(long, default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub message: String,
    pub fix: String,
}

impl Check {
    fn pass(check: impl Into<String>, message: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: true,
            message: message.into(),
            fix: String::new(),
        }
    }

    fn fail(check: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: false,
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// `✔ <check>[: <message>]` or `✘ <check>: <message> — fix: <fix>`.
    pub fn line(&self) -> String {
        match (self.ok, self.message.is_empty()) {
            (true, true) => format!("✔ {}", self.check),
            (true, false) => format!("✔ {}: {}", self.check, self.message),
            (false, _) => format!("✘ {}: {} — fix: {}", self.check, self.message, self.fix),
        }
    }
}

/// Runs the doctor, prints the report, returns the exit code (0, 1 or 2; see the module doc).
pub fn main(args: &DoctorArgs) -> u8 {
    crate::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return 2;
        }
    };
    let (checks, code) = match runtime.block_on(run(args)) {
        Ok(checks) => {
            let code = if checks.iter().all(|c| c.ok) { 0 } else { 1 };
            (checks, code)
        }
        Err(unreachable) => (vec![unreachable], 2),
    };
    match args.output {
        Output::Text => {
            for c in &checks {
                if code == 2 {
                    eprintln!("{}", c.line());
                } else {
                    println!("{}", c.line());
                }
            }
        }
        Output::Json => match serde_json::to_string_pretty(&checks) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        },
    }
    code
}

const REACH: &str = "the Kubernetes API is reachable";

/// Every check, in report order; `Err` when the cluster cannot be reached at all.
pub async fn run(args: &DoctorArgs) -> Result<Vec<Check>, Check> {
    let (client, url) = connect(args).await?;
    if let Err(e) = client.apiserver_version().await {
        let (message, fix) = match &e {
            kube::Error::Api(s) if s.code == 401 => (
                format!("{url} refused the credentials: {}", s.message),
                "use a kubeconfig whose user the cluster accepts (kubectl get --raw /version)"
                    .to_owned(),
            ),
            _ => (
                format!("cannot reach the Kubernetes API at {url}: {}", chain(&e)),
                "check that the cluster is up and that the kubeconfig (--kubeconfig, \
                 $KUBECONFIG, --context) points at it: kubectl cluster-info"
                    .to_owned(),
            ),
        };
        return Err(Check::fail(REACH, message, fix));
    }
    Ok(Doctor { args, client }.checks().await)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

async fn connect(args: &DoctorArgs) -> Result<(Client, String), Check> {
    let unusable = |message: String| {
        Check::fail(
            REACH,
            message,
            "point --kubeconfig, $KUBECONFIG or --context at the cluster, or run doctor in it",
        )
    };
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let mut config = match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| unusable(format!("{}: {}", path.display(), chain(&e))))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| unusable(format!("{}: {}", path.display(), chain(&e))))?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| unusable(format!("kubeconfig context {context:?}: {}", chain(&e))))?,
        (None, None) => kube::Config::infer().await.map_err(|e| {
            unusable(format!(
                "no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster: {}",
                chain(&e)
            ))
        })?,
    };
    config.connect_timeout = Some(args.timeout);
    config.read_timeout = Some(args.timeout);
    let url = config.cluster_url.to_string();
    let url = url.trim_end_matches('/').to_owned();
    let client = Client::try_from(config)
        .map_err(|e| unusable(format!("creating a client for {url}: {}", chain(&e))))?;
    Ok((client, url))
}

/// Why a read failed, phrased for the check that needed it.
enum Denied {
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        namespace: Option<String>,
        message: String,
    },
    Failed(String),
}

impl Denied {
    fn check(&self, check: &str) -> Check {
        match self {
            Denied::Forbidden {
                verb,
                resource,
                namespace,
                message,
            } => {
                let ns = namespace
                    .as_ref()
                    .map(|n| format!(" -n {n}"))
                    .unwrap_or_default();
                Check::fail(
                    check,
                    format!("not checked: forbidden to {verb} {resource}: {message}"),
                    format!(
                        "grant the user doctor runs as `{verb}` on {resource} (kubectl auth \
                         can-i {verb} {resource}{ns}), or run doctor as a cluster admin"
                    ),
                )
            }
            Denied::Failed(message) => Check::fail(
                check,
                format!("not checked: {message}"),
                "retry; check the API server (kubectl get --raw /readyz)",
            ),
        }
    }
}

fn denied(
    e: kube::Error,
    verb: &'static str,
    resource: &'static str,
    namespace: Option<&str>,
) -> Denied {
    match e {
        kube::Error::Api(s) if s.code == 403 => Denied::Forbidden {
            verb,
            resource,
            namespace: namespace.map(str::to_owned),
            message: s.message,
        },
        other => Denied::Failed(format!("{verb} {resource}: {}", chain(&other))),
    }
}

struct Doctor<'a> {
    args: &'a DoctorArgs,
    client: Client,
}

/// What the ConfigMap check found, for the checks that use the config.
enum Loaded {
    Valid(Box<Config>),
    /// Missing, invalid or unreadable: the ConfigMap check already failed.
    Unusable,
}

impl Doctor<'_> {
    fn config_map_ref(&self) -> (String, String) {
        match self.args.config_map.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (self.args.namespace.clone(), self.args.config_map.clone()),
        }
    }

    async fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let name = &self.args.webhook_config;

        // The ConfigMap first: several checks need the profiles.
        let mut config_checks = Vec::new();
        let config = self.config(&mut config_checks).await;

        // Our configuration and the injector's.
        let all = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| denied(e, "list", "mutatingwebhookconfigurations", None));
        let exists = format!("MutatingWebhookConfiguration {name} exists");
        let injector_check = "the Vault Agent Injector's MutatingWebhookConfiguration exists";
        let (ours, injectors) = match all {
            Err(d) => {
                out.push(d.check(&exists));
                out.push(d.check(injector_check));
                (None, Vec::new())
            }
            Ok(list) => {
                let ours = list
                    .items
                    .iter()
                    .find(|m| m.metadata.name.as_deref() == Some(name))
                    .cloned();
                match &ours {
                    Some(_) => out.push(Check::pass(&exists, "")),
                    None => out.push(Check::fail(
                        &exists,
                        "not found, so no Pod gets the Vault annotations",
                        "kubectl apply -k manifests (or your overlay), or pass --webhook-config \
                         with its name",
                    )),
                }
                let injectors: Vec<MutatingWebhookConfiguration> = list
                    .items
                    .into_iter()
                    .filter(|m| m.metadata.name.as_deref() != Some(name))
                    .filter(|m| match &self.args.injector_config {
                        Some(n) => m.metadata.name.as_deref() == Some(n),
                        None => is_injector(m),
                    })
                    .collect();
                if injectors.is_empty() {
                    out.push(Check::fail(
                        injector_check,
                        match &self.args.injector_config {
                            Some(n) => format!("{n} not found"),
                            None => "none found (no configuration named *agent-injector* or with \
                                     a webhook vault.hashicorp.com)"
                                .to_owned(),
                        },
                        "install the Vault Agent Injector (the Vault Helm chart with \
                         injector.enabled=true), or pass --injector-config NAME",
                    ));
                } else {
                    let names: Vec<String> = injectors.iter().map(mwc_name).collect();
                    out.push(Check::pass(injector_check, names.join(", ")));
                }
                (ours, injectors)
            }
        };

        if let Some(ours) = &ours {
            for inj in &injectors {
                out.push(order_check(ours, inj));
            }
            out.extend(failure_policy_checks(ours));
            for hook in ours.webhooks.iter().flatten() {
                out.push(self.ca_bundle_check(hook).await);
            }
        }

        // Which namespaces opted in (by our webhook's namespaceSelector).
        let opt_in_selector = ours
            .as_ref()
            .and_then(|m| m.webhooks.as_ref())
            .and_then(|w| w.first())
            .and_then(|w| w.namespace_selector.clone())
            .unwrap_or_else(|| LabelSelector {
                match_labels: Some([(OPT_IN.0.to_owned(), OPT_IN.1.to_owned())].into()),
                match_expressions: None,
            });
        let ns_check = "namespaces opted in";
        let namespaces = match Api::<Namespace>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Err(e) => {
                out.push(denied(e, "list", "namespaces", None).check(ns_check));
                None
            }
            Ok(list) => {
                let opted: Vec<(String, Labels)> = list
                    .items
                    .into_iter()
                    .filter_map(|n| {
                        let labels = n.metadata.labels.unwrap_or_default();
                        let name = n.metadata.name?;
                        selector::matches(Some(&opt_in_selector), &labels).then_some((name, labels))
                    })
                    .collect();
                if opted.is_empty() {
                    out.push(Check::fail(
                        ns_check,
                        "no namespace is selected by the webhook's namespaceSelector",
                        format!(
                            "kubectl label namespace istio-system {}={}",
                            OPT_IN.0, OPT_IN.1
                        ),
                    ));
                } else {
                    let names: Vec<&str> = opted.iter().map(|(n, _)| n.as_str()).collect();
                    out.push(Check::pass(ns_check, names.join(", ")));
                }
                Some(opted)
            }
        };

        // The Pods the profiles select, as label sets (or app=istiod with no usable config,
        // the Pods the webhook then denies).
        let profiles: Vec<(String, Labels)> = match &config {
            Loaded::Valid(c) => c
                .profiles
                .iter()
                .map(|p| (p.name.clone(), p.selector.clone()))
                .collect(),
            Loaded::Unusable => vec![(
                "istiod".to_owned(),
                [("app".into(), "istiod".into())].into(),
            )],
        };

        if let Some(namespaces) = &namespaces {
            for inj in &injectors {
                out.push(injector_selects(inj, namespaces, &profiles));
            }
        }
        if let (Some(ours), Loaded::Valid(_)) = (&ours, &config) {
            out.extend(match_condition_checks(ours, &profiles));
        }

        out.extend(self.guard_checks(&config, namespaces.as_deref()).await);
        out.extend(config_checks);

        if let (Some(namespaces), Loaded::Valid(c)) = (&namespaces, &config) {
            out.extend(self.pod_checks(c, namespaces).await);
        }
        out
    }

    async fn config(&self, out: &mut Vec<Check>) -> Loaded {
        let (ns, name) = self.config_map_ref();
        let check = format!("ConfigMap {ns}/{name} is valid");
        let cm = match Api::<ConfigMap>::namespaced(self.client.clone(), &ns)
            .get_opt(&name)
            .await
        {
            Err(e) => {
                out.push(denied(e, "get", "configmaps", Some(&ns)).check(&check));
                return Loaded::Unusable;
            }
            Ok(None) => {
                out.push(Check::fail(
                    &check,
                    "not found: the webhook denies every istiod Pod until it exists",
                    "kubectl apply -k manifests (the ConfigMap is manifests/base/configmap.yaml), \
                         or pass --config-map NAMESPACE/NAME",
                ));
                return Loaded::Unusable;
            }
            Ok(Some(cm)) => cm,
        };
        // The same parser and errors as `check` on a ConfigMap manifest.
        let document = match serde_json::to_string(&cm) {
            Ok(d) => d,
            Err(e) => {
                out.push(Check::fail(&check, e.to_string(), "report a bug"));
                return Loaded::Unusable;
            }
        };
        match Config::from_document(&document) {
            Ok(c) => {
                out.push(Check::pass(&check, c.summary()));
                Loaded::Valid(Box::new(c))
            }
            Err(e) => {
                let problems: Vec<String> = e.to_string().lines().map(str::to_owned).collect();
                out.push(Check::fail(
                    &check,
                    problems.join("; "),
                    format!(
                        "kubectl edit configmap {name} -n {ns} (validate first: \
                         istio-vault-webhook check FILE); the webhook keeps serving its last \
                         valid config, or denies istiod Pods if it never had one"
                    ),
                ));
                Loaded::Unusable
            }
        }
    }

    async fn ca_bundle_check(&self, hook: &MutatingWebhook) -> Check {
        let check = format!("caBundle of {} trusts the webhook's certificate", hook.name);
        let bundle = hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let fix_empty = "the webhook fills it itself with --tls-self-signed --webhook-config \
                         (check its logs and its RBAC on mutatingwebhookconfigurations), or \
                         cert-manager's CA injector does (components/cert-manager)";
        if bundle.is_empty() {
            return Check::fail(
                check,
                "caBundle is empty: the API server cannot verify the webhook",
                fix_empty,
            );
        }
        let timeout = self.args.timeout;
        if let Some(url) = &hook.client_config.url {
            let Ok(uri) = url.parse::<axum::http::Uri>() else {
                return Check::fail(
                    check,
                    format!("{url:?} is not a URL"),
                    "fix clientConfig.url",
                );
            };
            let host = uri.host().unwrap_or_default().to_owned();
            let addr = format!("{host}:{}", uri.port_u16().unwrap_or(443));
            return match probe::verify(&addr, &host, &bundle, timeout).await {
                Ok(()) => Check::pass(check, format!("{url} verified for {host}")),
                Err(e) => probe_failure(check, url, e, fix_empty, &self.args.namespace),
            };
        }
        let Some(svc) = &hook.client_config.service else {
            return Check::fail(
                check,
                "clientConfig has neither url nor service",
                "re-apply the shipped MutatingWebhookConfiguration",
            );
        };
        let server_name = format!("{}.{}.svc", svc.name, svc.namespace);
        let targets = match self
            .endpoints(&svc.namespace, &svc.name, svc.port.unwrap_or(443))
            .await
        {
            Ok(t) => t,
            Err(Ok(d)) => return d.check(&check),
            Err(Err(message)) => {
                return Check::fail(
                    check,
                    message,
                    format!(
                        "check the webhook's Pods and Service: kubectl get pods,endpointslices -n {}",
                        svc.namespace
                    ),
                );
            }
        };
        let mut unreachable = Vec::new();
        for addr in &targets {
            match probe::verify(addr, &server_name, &bundle, timeout).await {
                Ok(()) => {
                    return Check::pass(check, format!("{addr} verified for {server_name}"));
                }
                Err(probe::ProbeError::Unreachable(e)) => unreachable.push(e),
                Err(e) => return probe_failure(check, addr, e, fix_empty, &self.args.namespace),
            }
        }
        Check::fail(
            check,
            format!(
                "not verified: the webhook's endpoints are not reachable from here ({})",
                unreachable.join("; ")
            ),
            "run doctor where Pod IPs are reachable (e.g. in a Pod in the cluster) to verify it",
        )
    }

    /// `host:port` of the ready endpoints behind a Service port.
    async fn endpoints(
        &self,
        namespace: &str,
        name: &str,
        port: i32,
    ) -> Result<Vec<String>, Result<Denied, String>> {
        let service = Api::<Service>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| Ok(denied(e, "get", "services", Some(namespace))))?
            .ok_or_else(|| Err(format!("Service {namespace}/{name} not found")))?;
        let port_name = service
            .spec
            .and_then(|s| s.ports)
            .into_iter()
            .flatten()
            .find(|p| p.port == port)
            .map(|p| p.name.unwrap_or_default())
            .ok_or_else(|| Err(format!("Service {namespace}/{name} has no port {port}")))?;
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), namespace)
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
            .await
            .map_err(|e| Ok(denied(e, "list", "endpointslices", Some(namespace))))?;
        let mut out = Vec::new();
        for slice in slices.items {
            let Some(target) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
                .and_then(|p| p.port)
            else {
                continue;
            };
            for ep in slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for a in ep.addresses {
                    out.push(if a.contains(':') {
                        format!("[{a}]:{target}")
                    } else {
                        format!("{a}:{target}")
                    });
                }
            }
        }
        if out.is_empty() {
            return Err(Err(format!(
                "Service {namespace}/{name} has no ready endpoints: the API server cannot call \
                 the webhook"
            )));
        }
        Ok(out)
    }

    async fn guard_checks(
        &self,
        config: &Loaded,
        namespaces: Option<&[(String, Labels)]>,
    ) -> Vec<Check> {
        let name = &self.args.guard_policy;
        let mut out = Vec::new();
        let exists = format!("guard ValidatingAdmissionPolicy {name} exists and type-checks");
        let fix_apply =
            "kubectl apply -k manifests (manifests/base/validatingadmissionpolicy.yaml)";
        let policy = match Api::<ValidatingAdmissionPolicy>::all(self.client.clone())
            .get_opt(name)
            .await
        {
            Err(e) => {
                out.push(denied(e, "get", "validatingadmissionpolicies", None).check(&exists));
                None
            }
            Ok(None) => {
                out.push(Check::fail(
                    &exists,
                    "not found: an istiod Pod the Vault injector skipped would start with a \
                     self-signed CA",
                    fix_apply,
                ));
                None
            }
            Ok(Some(p)) => {
                let warnings: Vec<String> = p
                    .status
                    .as_ref()
                    .and_then(|s| s.type_checking.as_ref())
                    .and_then(|t| t.expression_warnings.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| {
                        let text: Vec<&str> = w.warning.split_whitespace().collect();
                        format!("{}: {}", w.field_ref, text.join(" "))
                    })
                    .collect();
                if warnings.is_empty() {
                    out.push(Check::pass(&exists, ""));
                } else {
                    out.push(Check::fail(
                        &exists,
                        format!("its CEL does not type-check: {}", warnings.join("; ")),
                        "re-apply the shipped policy (manifests/base/validatingadmissionpolicy.yaml)",
                    ));
                }
                Some(p)
            }
        };

        let bound = format!("guard policy {name} is bound with validationActions Deny");
        match Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Err(e) => {
                out.push(denied(e, "list", "validatingadmissionpolicybindings", None).check(&bound))
            }
            Ok(list) => {
                let bindings: Vec<&ValidatingAdmissionPolicyBinding> = list
                    .items
                    .iter()
                    .filter(|b| {
                        b.spec.as_ref().and_then(|s| s.policy_name.as_deref()) == Some(name)
                    })
                    .collect();
                let denies = bindings.iter().any(|b| {
                    b.spec
                        .as_ref()
                        .and_then(|s| s.validation_actions.as_ref())
                        .is_some_and(|a| a.iter().any(|x| x == "Deny"))
                });
                if bindings.is_empty() {
                    out.push(Check::fail(
                        &bound,
                        "no ValidatingAdmissionPolicyBinding names it, so the policy never runs",
                        fix_apply,
                    ));
                } else if !denies {
                    out.push(Check::fail(
                        &bound,
                        "its bindings only warn or audit, so an uninjected istiod is admitted",
                        format!(
                            "set validationActions: [Deny] on the binding ({})",
                            bindings
                                .iter()
                                .filter_map(|b| b.metadata.name.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                } else {
                    out.push(Check::pass(&bound, ""));
                }
            }
        }

        // It must select what the istiod profile selects.
        if let (Some(policy), Loaded::Valid(c)) = (&policy, config)
            && let Some(istiod) = c.istiod()
        {
            let check = format!("guard policy {name} selects the istiod profile's Pods");
            let constraints = policy
                .spec
                .as_ref()
                .and_then(|s| s.match_constraints.as_ref());
            let object_selector = constraints.and_then(|m| m.object_selector.as_ref());
            let namespace_selector = constraints.and_then(|m| m.namespace_selector.as_ref());
            let missed_ns: Vec<&str> = namespaces
                .into_iter()
                .flatten()
                .filter(|(_, labels)| !selector::matches(namespace_selector, labels))
                .map(|(n, _)| n.as_str())
                .collect();
            if !selector::matches(object_selector, &istiod.selector) {
                out.push(Check::fail(
                    &check,
                    format!(
                        "its objectSelector does not select Pods labelled {} (the istiod \
                         profile's match), so they are not guarded",
                        selector::show(&istiod.selector)
                    ),
                    format!(
                        "set spec.matchConstraints.objectSelector.matchLabels of \
                         validatingadmissionpolicy/{name} to the istiod profile's match"
                    ),
                ));
            } else if !missed_ns.is_empty() {
                out.push(Check::fail(
                    &check,
                    format!(
                        "its namespaceSelector leaves out opted-in namespaces: {}",
                        missed_ns.join(", ")
                    ),
                    format!(
                        "give validatingadmissionpolicy/{name} the webhook's namespaceSelector \
                         ({}={})",
                        OPT_IN.0, OPT_IN.1
                    ),
                ));
            } else {
                out.push(Check::pass(&check, selector::show(&istiod.selector)));
            }
        }
        out
    }

    async fn pod_checks(&self, config: &Config, namespaces: &[(String, Labels)]) -> Vec<Check> {
        let mut out = Vec::new();
        let mut checked = 0usize;
        let summary = "istiod and gateway Pods in opted-in namespaces are injected with the \
                       current config";
        let mut listed_all = true;
        for (ns, _) in namespaces {
            let pods = match Api::<Pod>::namespaced(self.client.clone(), ns)
                .list(&ListParams::default())
                .await
            {
                Ok(p) => p.items,
                Err(e) => {
                    listed_all = false;
                    out.push(denied(e, "list", "pods", Some(ns)).check(&format!(
                        "istiod and gateway Pods in namespace {ns} are injected with the current \
                         config"
                    )));
                    continue;
                }
            };
            for pod in pods {
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                let matching: Vec<&str> = config
                    .profiles
                    .iter()
                    .filter(|p| p.matches(|k| labels.get(k).map(String::as_str)))
                    .map(|p| p.name.as_str())
                    .collect();
                let [profile] = matching[..] else {
                    continue;
                };
                checked += 1;
                let name = pod.metadata.name.clone().unwrap_or_default();
                let annotations = pod.metadata.annotations.clone().unwrap_or_default();
                let get = |k: &str| annotations.get(k).map(String::as_str);
                let problem = if get(keys::PROFILE) != Some(profile) {
                    Some(format!(
                        "not mutated by istio-vault-webhook (no {}: {profile}), so it has no \
                         Vault annotations",
                        keys::PROFILE
                    ))
                } else if get(keys::INJECT_STATUS) != Some("injected") {
                    Some(format!(
                        "the Vault Agent Injector did not inject it (no {}: injected), so no \
                         agent renders its files",
                        keys::INJECT_STATUS
                    ))
                } else if get(keys::CONFIG_HASH) != Some(config.hash.as_str()) {
                    Some(format!(
                        "injected with config-hash {}, the ConfigMap is now {}",
                        get(keys::CONFIG_HASH).unwrap_or("(none)"),
                        config.hash
                    ))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let fix = self.restart_command(&pod, ns).await;
                    out.push(Check::fail(
                        format!(
                            "Pod {ns}/{name} (profile {profile}) is injected with the current config"
                        ),
                        problem,
                        fix,
                    ));
                }
            }
        }
        if out.is_empty() && listed_all {
            out.push(Check::pass(
                summary,
                match checked {
                    0 => "no such Pods yet".to_owned(),
                    1 => "1 Pod".to_owned(),
                    n => format!("{n} Pods"),
                },
            ));
        }
        out
    }

    /// The command that recreates `pod` through admission: its workload's rollout restart.
    async fn restart_command(&self, pod: &Pod, ns: &str) -> String {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let Some(owner) = owner else {
            return format!("recreate it: kubectl delete pod {name} -n {ns}, then create it again");
        };
        let workload = match owner.kind.as_str() {
            "ReplicaSet" => {
                let from_api = Api::<ReplicaSet>::namespaced(self.client.clone(), ns)
                    .get_opt(&owner.name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|rs| {
                        rs.metadata
                            .owner_references
                            .into_iter()
                            .flatten()
                            .find(|o| o.kind == "Deployment")
                            .map(|o| o.name)
                    });
                // Not readable (or gone): a Deployment's ReplicaSet is named
                // <deployment>-<pod-template-hash>.
                let from_name = || {
                    let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
                    owner
                        .name
                        .strip_suffix(hash.as_str())?
                        .strip_suffix('-')
                        .map(str::to_owned)
                };
                match from_api.or_else(from_name) {
                    Some(d) => format!("deployment/{d}"),
                    None => format!("replicaset/{}", owner.name),
                }
            }
            "StatefulSet" => format!("statefulset/{}", owner.name),
            "DaemonSet" => format!("daemonset/{}", owner.name),
            other => {
                return format!(
                    "recreate it (owned by {other} {}): kubectl delete pod {name} -n {ns}",
                    owner.name
                );
            }
        };
        if workload.starts_with("replicaset/") {
            return format!("kubectl delete pod {name} -n {ns} (its {workload} recreates it)");
        }
        format!("kubectl rollout restart {workload} -n {ns}")
    }
}

fn probe_failure(
    check: String,
    target: &str,
    e: probe::ProbeError,
    fix_untrusted: &str,
    namespace: &str,
) -> Check {
    match e {
        probe::ProbeError::Untrusted(why) => Check::fail(
            check,
            format!("{target} serves a certificate caBundle does not verify: {why}"),
            fix_untrusted,
        ),
        probe::ProbeError::Unreachable(why) => Check::fail(
            check,
            format!("not verified: the webhook is not reachable from here ({why})"),
            format!(
                "start the webhook (kubectl get pods -n {namespace}), or run doctor where \
                 clientConfig's address is reachable"
            ),
        ),
    }
}

fn mwc_name(m: &MutatingWebhookConfiguration) -> String {
    m.metadata.name.clone().unwrap_or_default()
}

/// The Vault Agent Injector's configuration, as the Vault Helm chart names it.
fn is_injector(m: &MutatingWebhookConfiguration) -> bool {
    mwc_name(m).contains("agent-injector")
        || m.webhooks.iter().flatten().any(|w| {
            w.name == "vault.hashicorp.com"
                || w.client_config
                    .service
                    .as_ref()
                    .is_some_and(|s| s.name.contains("agent-injector"))
        })
}

/// The API server calls mutating webhook configurations in name order; the injector reads our
/// annotations only if it runs after us, or is reinvoked.
fn order_check(
    ours: &MutatingWebhookConfiguration,
    injector: &MutatingWebhookConfiguration,
) -> Check {
    let (a, b) = (mwc_name(ours), mwc_name(injector));
    let check = format!("{a} runs before the Vault Agent Injector ({b})");
    if a < b {
        return Check::pass(check, format!("{a} sorts before {b}"));
    }
    let not_reinvoked: Vec<String> = injector
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.reinvocation_policy.as_deref() != Some("IfNeeded"))
        .map(|w| w.name.clone())
        .collect();
    if not_reinvoked.is_empty() {
        return Check::pass(
            check,
            format!("{a} sorts after {b}, whose webhooks have reinvocationPolicy IfNeeded"),
        );
    }
    Check::fail(
        check,
        format!(
            "{a} sorts after {b} and {} is not reinvoked, so the injector runs first and never \
             sees the Vault annotations",
            not_reinvoked.join(", ")
        ),
        format!(
            "name our MutatingWebhookConfiguration so it sorts before {b} (the shipped name \
             istio-vault-webhook does), or set reinvocationPolicy: IfNeeded on the injector's \
             webhook (components/vault-injector-reinvocation)"
        ),
    )
}

fn failure_policy_checks(ours: &MutatingWebhookConfiguration) -> Vec<Check> {
    let name = mwc_name(ours);
    ours.webhooks
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, w)| {
            // v1 defaults an absent failurePolicy to Fail.
            let policy = w.failure_policy.as_deref().unwrap_or("Fail");
            let check = format!("{} fails closed (failurePolicy Fail)", w.name);
            if policy == "Fail" {
                Check::pass(check, "")
            } else {
                Check::fail(
                    check,
                    format!(
                        "failurePolicy is {policy}: while the webhook is down istiod Pods are \
                         admitted without Vault annotations and start with a self-signed CA"
                    ),
                    format!(
                        "kubectl patch mutatingwebhookconfiguration {name} --type=json -p \
                         '[{{\"op\":\"replace\",\"path\":\"/webhooks/{i}/failurePolicy\",\"value\":\"Fail\"}}]'"
                    ),
                )
            }
        })
        .collect()
}

/// A Pod carrying exactly `labels`, for selectors and CEL.
fn pod_with(labels: &Labels, namespace: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "labels": labels},
    })
}

/// Every profile's Pods pass our webhook's objectSelector and matchConditions.
fn match_condition_checks(
    ours: &MutatingWebhookConfiguration,
    profiles: &[(String, Labels)],
) -> Vec<Check> {
    let name = mwc_name(ours);
    let mut out = Vec::new();
    let mut covered = Vec::new();
    for (profile, labels) in profiles {
        let check = format!("the webhook is called for profile {profile}'s Pods");
        let pod = pod_with(labels, "");
        let mut problem = None;
        for w in ours.webhooks.iter().flatten() {
            if !selector::matches(w.object_selector.as_ref(), labels) {
                problem = Some((
                    format!(
                        "{}'s objectSelector excludes Pods labelled {}",
                        w.name,
                        selector::show(labels)
                    ),
                    format!("widen objectSelector of mutatingwebhookconfiguration/{name}"),
                ));
                break;
            }
            for c in w.match_conditions.iter().flatten() {
                match cel::evaluate(&c.expression, &pod) {
                    Ok(true) => {}
                    Ok(false) => {
                        problem = Some((
                            format!(
                                "matchCondition {} is false for Pods labelled {}, so the API \
                                 server never sends them to the webhook",
                                c.name,
                                selector::show(labels)
                            ),
                            format!(
                                "extend matchCondition {} of mutatingwebhookconfiguration/{name} \
                                 to admit {} (manifests/base/mutatingwebhookconfiguration.yaml), \
                                 then re-apply",
                                c.name,
                                selector::show(labels)
                            ),
                        ));
                    }
                    Err(e) => {
                        problem = Some((
                            format!("matchCondition {}: {e}", c.name),
                            format!(
                                "check by hand that matchCondition {} admits Pods labelled {}",
                                c.name,
                                selector::show(labels)
                            ),
                        ));
                    }
                }
                if problem.is_some() {
                    break;
                }
            }
            if problem.is_some() {
                break;
            }
        }
        match problem {
            Some((message, fix)) => out.push(Check::fail(check, message, fix)),
            None => covered.push(profile.as_str()),
        }
    }
    if out.is_empty() {
        out.push(Check::pass(
            "the webhook's matchConditions admit every profile's Pods",
            covered.join(", "),
        ));
    }
    out
}

/// The injector's selectors let the opted-in namespaces and the profiles' Pods through.
fn injector_selects(
    injector: &MutatingWebhookConfiguration,
    namespaces: &[(String, Labels)],
    profiles: &[(String, Labels)],
) -> Check {
    let name = mwc_name(injector);
    let check = format!("{name} lets the opted-in namespaces' istiod and gateway Pods through");
    let mut problems = Vec::new();
    for w in injector.webhooks.iter().flatten() {
        for (ns, labels) in namespaces {
            if ns == "kube-system" || ns == "kube-public" {
                problems.push(format!("the injector never injects in {ns}"));
            } else if !selector::matches(w.namespace_selector.as_ref(), labels) {
                problems.push(format!(
                    "{}'s namespaceSelector excludes namespace {ns}",
                    w.name
                ));
            }
        }
        for (profile, labels) in profiles {
            if !selector::matches(w.object_selector.as_ref(), labels) {
                problems.push(format!(
                    "{}'s objectSelector excludes profile {profile}'s Pods ({})",
                    w.name,
                    selector::show(labels)
                ));
            }
            let pod = pod_with(labels, "");
            for c in w.match_conditions.iter().flatten() {
                match cel::evaluate(&c.expression, &pod) {
                    Ok(true) => {}
                    Ok(false) => problems.push(format!(
                        "{}'s matchCondition {} excludes profile {profile}'s Pods",
                        w.name, c.name
                    )),
                    Err(e) => problems.push(format!("{}'s matchCondition {}: {e}", w.name, c.name)),
                }
            }
        }
    }
    if problems.is_empty() {
        let names: Vec<&str> = namespaces.iter().map(|(n, _)| n.as_str()).collect();
        Check::pass(check, names.join(", "))
    } else {
        Check::fail(
            check,
            format!(
                "{}: those Pods get our annotations but no Vault agent",
                problems.join("; ")
            ),
            format!(
                "widen namespaceSelector/objectSelector of mutatingwebhookconfiguration/{name} \
                 (the Vault chart's injector.namespaceSelector / injector.objectSelector values)"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mwc(v: Value) -> MutatingWebhookConfiguration {
        serde_json::from_value(v).unwrap()
    }

    fn shipped() -> MutatingWebhookConfiguration {
        mwc(json!({
            "metadata": {"name": "istio-vault-webhook"},
            "webhooks": [{
                "name": "pods.istio-vault-webhook.svc",
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
                "failurePolicy": "Fail",
                "matchConditions": [{"name": "istiod-or-istio-gateway", "expression":
                    "has(object.metadata.labels) && (('app' in object.metadata.labels && object.metadata.labels['app'] == 'istiod') || ('istio' in object.metadata.labels && object.metadata.labels['istio'] in ['ingressgateway', 'egressgateway']))"}],
            }],
        }))
    }

    fn injector(name: &str, reinvocation: Option<&str>) -> MutatingWebhookConfiguration {
        mwc(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "vault.hashicorp.com",
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {"name": "vault-agent-injector-svc", "namespace": "vault"}},
                "reinvocationPolicy": reinvocation,
                "objectSelector": {"matchExpressions": [{"key": "app.kubernetes.io/name",
                    "operator": "NotIn", "values": ["vault-agent-injector"]}]},
            }],
        }))
    }

    fn labels(k: &str, v: &str) -> Labels {
        [(k.to_owned(), v.to_owned())].into()
    }

    #[test]
    fn order() {
        let inj = injector("vault-agent-injector-cfg", None);
        assert!(is_injector(&inj));
        assert!(order_check(&shipped(), &inj).ok);
        let mut late = shipped();
        late.metadata.name = Some("zz-istio-vault-webhook".into());
        let c = order_check(&late, &inj);
        assert!(!c.ok, "{c:?}");
        assert!(
            order_check(
                &late,
                &injector("vault-agent-injector-cfg", Some("IfNeeded"))
            )
            .ok
        );
    }

    #[test]
    fn match_conditions() {
        let profiles = vec![
            ("istiod".to_owned(), labels("app", "istiod")),
            (
                "ingressgateway".to_owned(),
                labels("istio", "ingressgateway"),
            ),
        ];
        let c = match_condition_checks(&shipped(), &profiles);
        assert_eq!(c.len(), 1);
        assert!(c[0].ok);
        let mut more = profiles.clone();
        more.push(("eastwest".to_owned(), labels("istio", "eastwestgateway")));
        let c = match_condition_checks(&shipped(), &more);
        assert_eq!(c.len(), 1);
        assert!(!c[0].ok);
        assert!(
            c[0].line().contains("istio=eastwestgateway"),
            "{}",
            c[0].line()
        );
    }

    #[test]
    fn injector_selection() {
        let ns = vec![("istio-system".to_owned(), labels(OPT_IN.0, OPT_IN.1))];
        let profiles = vec![("istiod".to_owned(), labels("app", "istiod"))];
        assert!(injector_selects(&injector("vault-agent-injector-cfg", None), &ns, &profiles).ok);
        let profiles = vec![(
            "x".to_owned(),
            labels("app.kubernetes.io/name", "vault-agent-injector"),
        )];
        assert!(!injector_selects(&injector("vault-agent-injector-cfg", None), &ns, &profiles).ok);
    }

    #[test]
    fn failure_policy() {
        let mut m = shipped();
        assert!(failure_policy_checks(&m)[0].ok);
        if let Some(w) = m.webhooks.as_mut() {
            w[0].failure_policy = Some("Ignore".into());
        }
        let c = &failure_policy_checks(&m)[0];
        assert!(!c.ok);
        assert!(c.fix.contains("/webhooks/0/failurePolicy"));
    }
}
