//! `serve`: wires config source, certificates, the HTTPS endpoint and the
//! admin server together. The only module that decides *what* runs; the
//! pieces it starts live in `source`, `tls`, `https` and `admin`.

pub mod admin;
pub mod https;
mod log_line;
mod logs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{LogFormat, ServeArgs};
use crate::config::{Config, EXAMPLE_CONFIG};
use crate::metrics::Metrics;
use crate::source::configmap::{self, ConfigMapRef};
use crate::source::{ConfigStore, file};
use crate::tls::ca_bundle::{self, CaBundle};
use crate::tls::{self, CertFiles, CertStore, self_signed};

/// Lifetime of a self-signed CA and serving certificate.
pub const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long `start` waits for the first read of the ConfigMap before
/// serving anyway (admissions before that would deny istiod needlessly).
pub const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on withdrawing this replica's CA from the caBundle at shutdown.
pub const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(3);

impl ServeArgs {
    /// `istio-vault-webhook` with no subcommand: `serve` with every default.
    pub fn default_for_cli() -> ServeArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Only::parse_from(["istio-vault-webhook"]).serve
    }
}

/// True inside a Pod (the kubelet sets this for every container).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// A running server, as `start` returns it.
pub struct Running {
    pub https_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The self-signed CA (PEM), when the server generated one.
    pub ca_pem: Option<String>,
    pub config: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    /// The served certificate.
    pub certs: Arc<CertStore>,
    /// The caBundle manager, with `--tls-self-signed --webhook-config`.
    pub ca_bundle: Option<Arc<CaBundle>>,
    pub shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until the servers have stopped (after `shutdown` and the drain).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts everything and returns once both listeners are bound.
pub async fn start(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<Running> {
    start_on(args, shutdown, https::Workers::current()).await
}

/// [`start`], serving HTTPS connections on `workers`.
///
/// The steps run in this order: bind both ports, start the config source,
/// set up the serving certificates, start the servers. Binding comes first
/// (as kubert's `ServerArgs::bind() -> Bound -> spawn()`, olix0r/kubert
/// kubert/src/server.rs): a second instance started on ports that are
/// taken fails before it writes a CA file or starts a task, so it cannot
/// disturb the instance that owns them.
pub async fn start_on(
    args: ServeArgs,
    shutdown: CancellationToken,
    workers: https::Workers,
) -> anyhow::Result<Running> {
    tls::install_default_provider();
    let bound = Bound::bind(&args).await?;
    let mut steps = Steps {
        args: &args,
        embedded: bound.embedded,
        metrics: Arc::new(Metrics::new()),
        shutdown,
        tasks: Vec::new(),
        kube: None,
    };
    let started = steps.start(bound, workers).await;
    if started.is_err() {
        // A later step failed: stop what the earlier ones started (a
        // watcher would otherwise outlive the error in an embedding process).
        for task in &steps.tasks {
            task.abort();
        }
    }
    started
}

/// Both listeners, bound and not yet served.
struct Bound {
    https: TcpListener,
    admin: TcpListener,
    /// Outside a cluster with no config flag: the embedded example on
    /// localhost.
    embedded: bool,
}

impl Bound {
    async fn bind(args: &ServeArgs) -> anyhow::Result<Bound> {
        let embedded = args.config.is_none()
            && args.config_map.is_none()
            && args.kube_api.is_none()
            && !in_cluster();
        let host = if embedded {
            [127, 0, 0, 1]
        } else {
            [0, 0, 0, 0]
        };
        let listen = args.listen.unwrap_or(SocketAddr::from((host, 8443)));
        let admin_listen = args.admin_listen.unwrap_or(SocketAddr::from((host, 8080)));
        let https = listen_on(listen, "--listen").await?;
        let admin = listen_on(admin_listen, "--admin-listen").await?;
        Ok(Bound {
            https,
            admin,
            embedded,
        })
    }
}

async fn listen_on(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another process (another istio-vault-webhook?) holds it: stop it or pass a free address"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}{hint}")
    })
}

/// What the serving certificates step hands to the servers.
struct Serving {
    certs: Arc<CertStore>,
    tls_config: Arc<rustls::ServerConfig>,
    /// The self-signed CA (PEM), when one was generated.
    ca_pem: Option<String>,
    ca_bundle: Option<Arc<CaBundle>>,
}

/// The state the steps of [`start_on`] share.
struct Steps<'a> {
    args: &'a ServeArgs,
    embedded: bool,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Everything started so far; [`Running::wait`] awaits them.
    tasks: Vec<JoinHandle<()>>,
    kube: Option<kube::Client>,
}

impl Steps<'_> {
    async fn start(&mut self, bound: Bound, workers: https::Workers) -> anyhow::Result<Running> {
        let config = self.config_source().await?;
        let serving = self.serving_certificates().await?;
        self.servers(bound, config, serving, workers)
    }

    /// `--config FILE` (watched), the embedded example, or the ConfigMap
    /// (watched through the API; waits up to [`FIRST_READ_TIMEOUT`] for the
    /// first read).
    async fn config_source(&mut self) -> anyhow::Result<Arc<ConfigStore>> {
        let args = self.args;
        if let Some(path) = &args.config {
            let store = Arc::new(ConfigStore::new(
                self.metrics.clone(),
                "file",
                format!(
                    "config file {} is missing or invalid; see /readyz",
                    path.display()
                ),
            ));
            let first = file::load_once(path, &store);
            self.tasks.push(tokio::spawn(file::watch(
                path.clone(),
                store.clone(),
                first,
                self.shutdown.clone(),
            )));
            return Ok(store);
        }
        if self.embedded {
            let store = Arc::new(ConfigStore::new(
                self.metrics.clone(),
                "embedded",
                "embedded example",
            ));
            store.set(Config::parse(EXAMPLE_CONFIG).context("embedded example config")?);
            return Ok(store);
        }
        let target = ConfigMapRef::parse(
            args.config_map.as_deref().unwrap_or("istio-vault-webhook"),
            &args.namespace,
        )?;
        let store = Arc::new(ConfigStore::new(
            self.metrics.clone(),
            "configmap",
            target.pending_message(),
        ));
        let client = kube_client(args, &mut self.kube).await?;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        self.tasks.push(tokio::spawn(configmap::watch(
            client,
            target.clone(),
            store.clone(),
            self.metrics.clone(),
            Some(first_tx),
            self.shutdown.clone(),
        )));
        if tokio::time::timeout(FIRST_READ_TIMEOUT, first_rx)
            .await
            .is_err()
        {
            tracing::warn!(configmap = %target, "ConfigMap not read yet; serving anyway (istiod Pods are denied until it is)");
        }
        Ok(store)
    }

    /// `--tls-cert/--tls-key` (reloaded on change) or a self-signed CA
    /// (rotated; published to `--ca-out` and, with `--webhook-config`, the
    /// caBundle). Everything that can fail runs before the CA file is
    /// written.
    async fn serving_certificates(&mut self) -> anyhow::Result<Serving> {
        let args = self.args;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            let files = CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            let (ck, seen) = files.load()?;
            let certs = CertStore::new(ck, self.metrics.clone());
            let tls_config = Arc::new(tls::server_config(
                certs.clone(),
                args.client_ca.as_deref(),
            )?);
            self.tasks.push(tokio::spawn(files.watch(
                certs.clone(),
                seen,
                self.shutdown.clone(),
            )));
            return Ok(Serving {
                certs,
                tls_config,
                ca_pem: None,
                ca_bundle: None,
            });
        }
        if !args.tls_self_signed && in_cluster() {
            bail!(
                "no serving certificate: pass --tls-cert FILE --tls-key FILE, or --tls-self-signed"
            );
        }
        let mut names = self_signed::service_names(&args.service_name, &args.namespace);
        names.push("localhost".into());
        let validity = args.self_signed_validity.unwrap_or(SELF_SIGNED_VALIDITY);
        let generated = self_signed::generate(&names, validity)?;
        let certs = CertStore::new(generated.key.clone(), self.metrics.clone());
        let tls_config = Arc::new(tls::server_config(
            certs.clone(),
            args.client_ca.as_deref(),
        )?);
        let client = match &args.webhook_config {
            Some(_) => Some(kube_client(args, &mut self.kube).await?),
            None => None,
        };
        let ca_out = args.ca_out.clone().or_else(|| {
            (!in_cluster()).then(|| {
                std::env::temp_dir()
                    .join("istio-vault-webhook")
                    .join("ca.pem")
            })
        });
        if let Some(path) = &ca_out {
            write_public(path, generated.ca_pem.as_bytes())?;
        }
        let ca_bundle = match (client, &args.webhook_config) {
            (Some(client), Some(name)) => {
                let bundle = CaBundle::new(client, name, self.metrics.clone(), ca_bundle::RESYNC);
                bundle.require(vec![generated.ca()]);
                self.tasks
                    .push(tokio::spawn(bundle.clone().run(self.shutdown.clone())));
                Some(bundle)
            }
            _ => None,
        };
        let ca_pem = Some(generated.ca_pem.clone());
        let rotation = self_signed::Rotator {
            names,
            validity,
            certs: certs.clone(),
            bundle: ca_bundle.clone(),
            ca_out,
            metrics: self.metrics.clone(),
        };
        self.tasks
            .push(tokio::spawn(rotation.run(generated, self.shutdown.clone())));
        Ok(Serving {
            certs,
            tls_config,
            ca_pem,
            ca_bundle,
        })
    }

    /// The HTTPS server and the admin server on the bound listeners. On
    /// shutdown HTTPS drains first, then this replica's CA leaves the
    /// caBundle, then the admin server stops.
    fn servers(
        &mut self,
        bound: Bound,
        config: Arc<ConfigStore>,
        serving: Serving,
        workers: https::Workers,
    ) -> anyhow::Result<Running> {
        let https_addr = bound.https.local_addr()?;
        let admin_addr = bound.admin.local_addr()?;
        let serving_flag = Arc::new(AtomicBool::new(true));
        let https_router = https::router(https::App {
            config: config.clone(),
            metrics: self.metrics.clone(),
        });
        let https_shutdown = self.shutdown.clone();
        let admin_stop = CancellationToken::new();
        {
            let accepting = serving_flag.clone();
            let admin_stop = admin_stop.clone();
            let drain = self.args.drain_timeout;
            let bundle = serving.ca_bundle.clone();
            let tls_config = serving.tls_config.clone();
            let listener = bound.https;
            self.tasks.push(tokio::spawn(async move {
                let not_ready = https_shutdown.clone();
                let flag = accepting;
                tokio::spawn(async move {
                    not_ready.cancelled().await;
                    flag.store(false, Ordering::Relaxed);
                });
                https::serve(
                    listener,
                    tls_config,
                    https_router,
                    https_shutdown,
                    drain,
                    workers,
                )
                .await;
                // Nothing can reach this replica any more: stop asking the API
                // server to trust it (other replicas' CAs stay).
                if let Some(bundle) = bundle {
                    match tokio::time::timeout(WITHDRAW_TIMEOUT, bundle.withdraw()).await {
                        Ok(Ok(outcome)) => {
                            tracing::info!(?outcome, "CA withdrawn from the caBundle")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %format!("{e:#}"), "CA not withdrawn from the caBundle; it is pruned when it expires")
                        }
                        Err(_) => tracing::warn!(
                            "CA withdrawal timed out; it is pruned from the caBundle when it expires"
                        ),
                    }
                }
                // The admin server outlives the drain so probes see "not ready"
                // rather than a refused connection while requests finish.
                admin_stop.cancel();
            }));
        }
        let admin_router = admin::router(admin::Admin {
            config: config.clone(),
            metrics: self.metrics.clone(),
            serving: serving_flag,
            ca_bundle: serving.ca_bundle.clone(),
        });
        self.tasks.push(tokio::spawn(admin::serve(
            bound.admin,
            admin_router,
            admin_stop,
        )));

        tracing::info!(%https_addr, %admin_addr, "serving");
        if self.embedded {
            print_local_help(https_addr, admin_addr)?;
        }
        Ok(Running {
            https_addr,
            admin_addr,
            ca_pem: serving.ca_pem,
            config,
            metrics: self.metrics.clone(),
            certs: serving.certs,
            ca_bundle: serving.ca_bundle,
            shutdown: self.shutdown.clone(),
            tasks: std::mem::take(&mut self.tasks),
        })
    }
}

/// The Kubernetes client, created on first use: `--kube-api URL`
/// (unauthenticated, for tests), else the kubeconfig ($KUBECONFIG,
/// ~/.kube/config), else the in-cluster service account.
async fn kube_client(
    args: &ServeArgs,
    cached: &mut Option<kube::Client>,
) -> anyhow::Result<kube::Client> {
    if let Some(client) = cached {
        return Ok(client.clone());
    }
    let config = match &args.kube_api {
        Some(url) => {
            let uri = url
                .parse::<axum::http::Uri>()
                .with_context(|| format!("--kube-api {url:?}: not a URL"))?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.context(
            "cannot reach the Kubernetes API: no kubeconfig ($KUBECONFIG, ~/.kube/config) \
             and not running in a cluster; use --config FILE outside a cluster",
        )?,
    };
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    *cached = Some(client.clone());
    Ok(client)
}

/// Entry point of `serve`: logs, runtime, signals.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Dropped last: writes out the log lines still buffered.
    let _flush = init_tracing(args.log_format);
    // HTTPS connections are served by `--workers` single-threaded runtimes
    // (see `https::Workers`); everything else, including the accept loop,
    // runs on this thread's runtime. Dropped before `_flush`.
    let (workers, _threads) = https::Workers::spawn(usize::from(args.workers))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let running = start_on(args, shutdown.clone(), workers).await?;
        let signal = wait_for_signal().await;
        tracing::info!(
            signal,
            "shutting down: no new connections, draining in-flight requests"
        );
        shutdown.cancel();
        running.wait().await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; run forever.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn init_tracing(format: LogFormat) -> Option<logs::Flush> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, flush) = match logs::batched() {
        Ok((w, f)) => (BoxMakeWriter::new(w), Some(f)),
        Err(e) => {
            eprintln!("cannot start the log writer thread ({e}); logging unbuffered");
            (BoxMakeWriter::new(std::io::stderr), None)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_timer(log_line::Timestamp)
            .fmt_fields(log_line::Fields)
            .try_init(),
    };
    flush
}

/// Writes a public file (the CA certificate), creating its directory.
fn write_public(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn print_local_help(https: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("istio-vault-webhook");
    let review = dir.join("istiod-review.json");
    write_public(&review, EXAMPLE_REVIEW.as_bytes())?;
    let ca = dir.join("ca.pem");
    println!(
        "\nistio-vault-webhook is serving the embedded example config (cluster1).\n\
         CA certificate: {ca}\n\
         Try it:\n  curl --cacert {ca} -H 'Content-Type: application/json' \
         --data @{review} https://localhost:{port}/mutate\n\
         Decode the patch:\n  ... | python3 -c 'import json,sys,base64; print(base64.b64decode(json.load(sys.stdin)[\"response\"][\"patch\"]).decode())'\n\
         Admin: http://{admin}/readyz  http://{admin}/metrics\n\
         Stop with Ctrl-C.\n",
        ca = ca.display(),
        review = review.display(),
        port = https.port(),
    );
    Ok(())
}

/// A minimal istiod Pod CREATE review for the local example.
const EXAMPLE_REVIEW: &str = r#"{
  "apiVersion": "admission.k8s.io/v1",
  "kind": "AdmissionReview",
  "request": {
    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
    "kind": {"group": "", "version": "v1", "kind": "Pod"},
    "resource": {"group": "", "version": "v1", "resource": "pods"},
    "namespace": "istio-system",
    "operation": "CREATE",
    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
    "object": {
      "apiVersion": "v1",
      "kind": "Pod",
      "metadata": {
        "generateName": "istiod-7d4b9c8f6-",
        "namespace": "istio-system",
        "labels": {"app": "istiod", "istio": "pilot", "istio.io/rev": "default"}
      },
      "spec": {
        "containers": [{
          "name": "discovery",
          "image": "docker.io/istio/pilot:1.28.0",
          "env": [{"name": "REVISION", "value": "default"}]
        }]
      }
    },
    "dryRun": false
  }
}
"#;
