//! The real binary: SIGTERM with an idle keep-alive connection and a
//! request in flight; JSON logs; in-cluster defaults (the Pod namespace's
//! ConfigMap through the kubeconfig/in-cluster client).

// Public so that helpers this file does not call are not dead code: each
// test file takes only the support modules it uses.
pub mod support {
    pub mod fake_apiserver;
    pub mod review;
    pub mod runtime;
}

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::fake_apiserver::FakeApiServer;
use support::review;
use support::runtime::{self as rt, CONFIG_C1, SERVICE_DNS};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

/// A spawned server, killed if the test fails before it exits.
struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    https: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Spawns `serve` with JSON logs on ephemeral ports and waits for the
    /// "serving" log line that carries the bound addresses.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the binary");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no \"serving\" log line; stderr so far:\n{}",
                    lines.lock().unwrap().join("\n")
                )
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "serving" {
                let addr = |k: &str| {
                    v[k].as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("{k} in {line}"))
                };
                return Server {
                    https: addr("https_addr"),
                    admin: addr("admin_addr"),
                    child,
                    lines,
                };
            }
        }
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
    }

    /// Waits for the process to exit, at most `timeout`.
    async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_closes_idle_connections_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, CONFIG_C1).unwrap();
    let ca_out = dir.path().join("ca.pem");
    // Two workers: the idle and the busy connection below land on different
    // ones (least connections first), so the drain spans both runtimes.
    let mut server = Server::spawn(
        &[
            "--config",
            config.to_str().unwrap(),
            "--tls-self-signed",
            "--ca-out",
            ca_out.to_str().unwrap(),
            "--workers",
            "2",
        ],
        &[],
    );
    let ca = std::fs::read(&ca_out).expect("--ca-out written before serving");
    let client = || rt::client_config(rt::roots(&ca), None);

    // An idle keep-alive connection, as the API server keeps them.
    let tls = rt::tls_connect(server.https, client(), SERVICE_DNS)
        .await
        .unwrap();
    let mut idle = rt::Http1::new(tls);
    let r = idle
        .request(
            "POST",
            "/mutate?timeout=10s",
            &review::istiod_review("idle"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // A request in flight: headers and half of the body sent.
    let body = review::istiod_review("in-flight");
    let tls = rt::tls_connect(server.https, client(), SERVICE_DNS)
        .await
        .unwrap();
    let mut busy = rt::Http1::new(tls);
    busy.send_head("POST", "/mutate?timeout=10s", body.len())
        .await
        .unwrap();
    let half = body.len() / 2;
    busy.stream.write_all(&body[..half]).await.unwrap();
    busy.stream.flush().await.unwrap();
    // Let the server read the head (it then owns a request in progress).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let t0 = Instant::now();
    server.sigterm();

    // The idle connection is closed promptly.
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.closed()).await;
    assert!(
        closed.is_ok(),
        "idle keep-alive connection still open 3 s after SIGTERM"
    );

    // No new connections are accepted.
    rt::eventually(
        "the HTTPS listener is closed",
        Duration::from_secs(3),
        async || {
            tokio::net::TcpStream::connect(server.https)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;

    // The in-flight request completes and gets its answer.
    busy.stream.write_all(&body[half..]).await.unwrap();
    busy.stream.flush().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), busy.read_response())
        .await
        .expect("in-flight request answered within 5 s")
        .expect("in-flight request answered, not dropped");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let answer = resp.json();
    assert_eq!(answer["response"]["uid"], "in-flight");
    assert_eq!(answer["response"]["allowed"], true);

    let status = server
        .exited(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running 5 s after SIGTERM; log:\n{}",
                server.log().join("\n")
            )
        });
    assert!(status.success(), "exit status {status}");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM to exit took {took:?}"
    );

    // --log-format json: every line is one JSON object.
    let log = server.log();
    for line in &log {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.is_object() && v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let messages: Vec<String> = log
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect();
    for want in ["serving", "stopped"] {
        assert!(
            messages.iter().any(|m| m == want),
            "no {want:?} log line in {messages:?}"
        );
    }
    // One line per admission (recognised by its fields: the admission
    // line's `message` field currently shadows the event message).
    let admissions: Vec<Value> = log
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["uid"].is_string() && v["outcome"].is_string())
        .collect();
    assert_eq!(admissions.len(), 2, "{admissions:#?}");
    assert!(
        admissions
            .iter()
            .any(|a| a["uid"] == "in-flight" && a["profile"] == "istiod"),
        "{admissions:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_defaults_follow_the_pod_namespace_configmap() {
    let fake = FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let ca_out = dir.path().join("ca.pem");
    // Inside a Pod: no --config-map, the namespace from the downward API;
    // the client from the kubeconfig (the in-cluster config is the fallback).
    let server = Server::spawn(
        &["--tls-self-signed", "--ca-out", ca_out.to_str().unwrap()],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "1"),
            ("POD_NAMESPACE", "team-x"),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    );
    let ca = std::fs::read(&ca_out).unwrap();
    let name = "istio-vault-webhook.team-x.svc";
    let v = rt::admit(server.https, &ca, name, &review::istiod_review("1")).await;
    assert!(!v.allowed);
    assert!(
        v.message()
            .contains("ConfigMap team-x/istio-vault-webhook not found"),
        "{}",
        v.message()
    );

    fake.apply_configmap(
        "team-x",
        "istio-vault-webhook",
        &[("config.yaml", CONFIG_C1)],
    );
    rt::eventually(
        "istiod admitted once the ConfigMap exists",
        Duration::from_secs(15),
        async || {
            let v = rt::admit(server.https, &ca, name, &review::istiod_review("2")).await;
            v.allowed.then_some(())
        },
    )
    .await;
    let ready = rt::admin_get(server.admin, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(
        ready.text().contains("cluster cluster1"),
        "{}",
        ready.text()
    );
    server.sigterm();
}

/// Runs `serve` that is expected to give up: its exit status and stderr
/// (killed, and the test failed, if it is still running after 15 s).
fn serve_that_fails(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the binary");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve {args:?} still running after 15 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_taken_ports_fails_at_once_and_keeps_the_first_ones_ca() {
    // The README's first command twice: the embedded example, its CA in the
    // temp directory.
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let first = Server::spawn(&[], &[("TMPDIR", tmpdir)]);
    let ca_path = tmp.path().join("istio-vault-webhook").join("ca.pem");
    let ca = std::fs::read(&ca_path).expect("the embedded example writes its CA");
    let https = first.https.to_string();
    let admin = first.admin.to_string();

    // The HTTPS port is taken.
    let t0 = Instant::now();
    let (status, stderr) = serve_that_fails(
        &["--listen", &https, "--admin-listen", "127.0.0.1:0"],
        &[("TMPDIR", tmpdir)],
    );
    assert!(!status.success(), "second instance exited with {status}");
    assert!(
        stderr.contains(&format!("cannot listen on {https} (--listen)")),
        "{stderr}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    // The admin port is taken (the HTTPS one is free): the same, though
    // the HTTPS port is bound first.
    let ca_out = tmp.path().join("second-ca.pem");
    std::fs::write(&ca_out, b"kept\n").unwrap();
    let (status, stderr) = serve_that_fails(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin,
            "--tls-self-signed",
            "--ca-out",
            ca_out.to_str().unwrap(),
        ],
        &[("TMPDIR", tmpdir)],
    );
    assert!(!status.success(), "second instance exited with {status}");
    assert!(
        stderr.contains(&format!("cannot listen on {admin} (--admin-listen)")),
        "{stderr}"
    );

    // Nothing was written, and the first instance still serves with its CA.
    assert!(
        std::fs::read(&ca_path).unwrap() == ca,
        "the first instance's CA file was overwritten"
    );
    assert_eq!(
        std::fs::read(&ca_out).unwrap(),
        b"kept\n",
        "--ca-out written"
    );
    let v = rt::admit(first.https, &ca, "localhost", &review::istiod_review("1")).await;
    assert!(v.allowed, "{v:?}");
    first.sigterm();
}
