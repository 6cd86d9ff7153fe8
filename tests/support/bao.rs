//! Test helpers around a real OpenBao (`bao`) binary: a dev server that is
//! killed on drop, the `bao` CLI, `bao agent`, and the translation of a Pod's
//! `vault.hashicorp.com/*` annotations into the agent configuration the Vault
//! Agent Injector (hashicorp/vault-k8s) would generate for its init container.
//!
//! Only std + serde_json + tempfile are used, so this module does not depend on
//! anything the webhook itself may change.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long `bao agent` may take to authenticate, render and exit.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the dev server may take to answer `/v1/sys/health`.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `bao` CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Finding the binary
// ---------------------------------------------------------------------------

/// The `bao` binary: `$BAO_BIN`, else `<repo>/.tools/bin/bao` (installed by
/// `scripts/install-test-tools`), else `bao` on `PATH`. Panics — never skips —
/// when there is none: these tests are the proof that the templates render.
pub fn find_bao() -> PathBuf {
    const HOWTO: &str = "run `scripts/install-test-tools` (it installs OpenBao's `bao` into \
                         .tools/bin/bao), or point BAO_BIN at a bao binary";
    if let Some(bin) = std::env::var_os("BAO_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "BAO_BIN={} is not an executable file; {HOWTO}",
            bin.display()
        );
        return bin;
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/bao");
    if is_executable(&local) {
        return local;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("bao");
            if is_executable(&candidate) {
                return candidate;
            }
        }
    }
    panic!(
        "the OpenBao `bao` binary was not found (not in $BAO_BIN, {}, nor on PATH): {HOWTO}",
        local.display()
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// 128 random bits as hex (std's RandomState is randomly keyed per instance).
pub fn random_hex() -> String {
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Last `max` bytes of a log file, for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            let prefix = if start > 0 { "[…]" } else { "" };
            format!("{prefix}{}", String::from_utf8_lossy(&bytes[start..]))
        }
        Err(e) => format!("<could not read {}: {e}>", path.display()),
    }
}

/// Kills and reaps a child process when dropped (also while unwinding from a
/// failed assertion), so no `bao` is left behind by a failing test.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits up to `timeout`; on timeout the child is killed and `None` returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

static LOG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Output of a finished command.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// Runs `cmd` with `stdin` as its standard input, capturing stdout/stderr in
/// files under `log_dir` (no pipe can fill up), killing it after `timeout`.
/// Panics with everything it printed when it times out.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    log_dir: &Path,
    timeout: Duration,
) -> Output {
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_path = log_dir.join(format!("cmd-{n}.stdout"));
    let err_path = log_dir.join(format!("cmd-{n}.stderr"));
    let out_file = fs::File::create(&out_path).expect("creating stdout log");
    let err_file = fs::File::create(&err_path).expect("creating stderr log");
    cmd.stdout(out_file).stderr(err_file);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let described = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {described}: {e}"));
    let pipe = child.stdin.take();
    let mut guard = ChildGuard::new(child);
    if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
        // A child that exits early closes the pipe; its exit status says why.
        let _ = pipe.write_all(input);
        drop(pipe);
    }
    let status = guard.wait_timeout(timeout);
    let stdout = fs::read(&out_path).unwrap_or_default();
    let stderr = fs::read(&err_path).unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{described} did not finish within {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A minimal HTTP/1.0 GET over loopback; returns (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

// ---------------------------------------------------------------------------
// Dev server
// ---------------------------------------------------------------------------

/// `bao server -dev` on a free loopback port, with a random root token; the
/// process is killed when this value is dropped.
pub struct BaoDev {
    pub bin: PathBuf,
    pub addr: String,
    pub token: String,
    /// Scratch directory of this server and everything the test writes.
    pub dir: tempfile::TempDir,
    log: PathBuf,
    server: ChildGuard,
}

impl BaoDev {
    pub fn start() -> Self {
        let bin = find_bao();
        let dir = tempfile::Builder::new()
            .prefix("ivw-vault-agent-")
            .tempdir()
            .expect("creating a temp dir");
        let token = format!("ivw-root-{}", random_hex());
        let mut last_log = String::new();
        // The port is free when chosen but could be taken before bao binds
        // it; try a few ports before giving up.
        for attempt in 0..3 {
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let log = dir.path().join(format!("server-{attempt}.log"));
            let log_file = fs::File::create(&log).expect("creating server log");
            let log_file2 = log_file.try_clone().expect("cloning server log handle");
            let child = Command::new(&bin)
                .args([
                    "server",
                    "-dev",
                    "-dev-no-store-token",
                    &format!("-dev-root-token-id={token}"),
                    &format!("-dev-listen-address={addr}"),
                ])
                // Keep the server off the developer's home and environment.
                .env("HOME", dir.path())
                .env_remove("BAO_ADDR")
                .env_remove("VAULT_ADDR")
                .env_remove("BAO_TOKEN")
                .env_remove("VAULT_TOKEN")
                .env_remove("BAO_DEV_LISTEN_ADDRESS")
                .env_remove("BAO_DEV_ROOT_TOKEN_ID")
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_file2)
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {} server -dev: {e}", bin.display()));
            let mut server = ChildGuard::new(child);
            let deadline = Instant::now() + SERVER_START_TIMEOUT;
            loop {
                if let Some(status) = server.try_wait() {
                    last_log = format!("bao server exited early ({status}):\n{}", tail(&log, 8000));
                    break;
                }
                if let Ok((200, _)) = http_get(addr, "/v1/sys/health") {
                    return Self {
                        bin,
                        addr: format!("http://{addr}"),
                        token,
                        dir,
                        log,
                        server,
                    };
                }
                if Instant::now() >= deadline {
                    panic!(
                        "bao server -dev on {addr} did not answer /v1/sys/health with 200 within \
                         {SERVER_START_TIMEOUT:?}; its log:\n{}",
                        tail(&log, 8000)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("could not start bao server -dev after 3 attempts; last:\n{last_log}");
    }

    pub fn server_log(&self) -> String {
        tail(&self.log, 8000)
    }

    /// A `bao` command with `BAO_ADDR`/`BAO_TOKEN` pointing at this server.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_NAMESPACE")
            .env_remove("VAULT_NAMESPACE")
            .current_dir(self.dir.path());
        cmd
    }

    /// Runs the `bao` CLI and panics (with its output) unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args);
        let out = run_with_timeout(cmd, None, self.dir.path(), CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "`bao {}` failed\n{}\n--- server log ---\n{}",
            args.join(" "),
            out.describe(),
            self.server_log()
        );
        out
    }

    /// `bao secrets enable -path=<path> -version=<1|2> kv`
    pub fn enable_kv(&self, path: &str, version: u8) {
        self.cli(&[
            "secrets",
            "enable",
            &format!("-path={path}"),
            &format!("-version={version}"),
            "kv",
        ]);
    }

    /// Stores `values` at `<mount>/<path>` with `bao kv put -mount=… path key=@file`.
    ///
    /// Each value is first written to a file and passed as `key=@file`: the CLI
    /// then stores the file's bytes exactly. Checked by experiment with OpenBao
    /// 2.7.2 (values "a\n", "b", "c\n\n", "\n\nd \r\n\t" read back unchanged
    /// through the HTTP API, for KV v1 and v2) — unlike `key=value` on a
    /// command line, nothing is trimmed. `read_kv` below re-checks it every run.
    pub fn put_kv(&self, mount: &str, path: &str, values: &BTreeMap<String, Vec<u8>>) {
        let files = self.dir.path().join(format!("kv-values-{}", random_hex()));
        fs::create_dir_all(&files).unwrap();
        let mut args = vec![
            "kv".to_string(),
            "put".to_string(),
            format!("-mount={mount}"),
            path.to_string(),
        ];
        for (i, (key, value)) in values.iter().enumerate() {
            let file = files.join(format!("value-{i}"));
            fs::write(&file, value).unwrap();
            args.push(format!("{key}=@{}", file.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli(&args);
    }

    /// Reads a KV secret back through the raw API path (`bao read -format=json`)
    /// and returns its key/value map: `.data` for KV v1, `.data.data` for KV v2.
    pub fn read_kv(&self, api_path: &str, kv_version: u8) -> BTreeMap<String, Vec<u8>> {
        let out = self.cli(&["read", "-format=json", api_path]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`bao read {api_path}` printed no JSON ({e}):\n{}",
                out.describe()
            )
        });
        let data = if kv_version == 2 {
            &v["data"]["data"]
        } else {
            &v["data"]
        };
        let map = data
            .as_object()
            .unwrap_or_else(|| panic!("`bao read {api_path}`: no data map in {v}"));
        map.iter()
            .map(|(k, v)| {
                let s = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{api_path}: value of {k} is not a string: {v}"));
                (k.clone(), s.as_bytes().to_vec())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// vault-k8s: annotations -> agent config
// ---------------------------------------------------------------------------

pub const PREFIX: &str = "vault.hashicorp.com/";
/// vault-k8s' default for `vault.hashicorp.com/secret-volume-path`
/// (agent-inject/agent/annotations.go, `Init`).
pub const DEFAULT_SECRET_VOLUME_PATH: &str = "/vault/secrets";

/// One `agent-inject-secret-<name>` as vault-k8s reads it.
#[derive(Debug, Clone)]
pub struct InjectedSecret {
    /// The annotation suffix as written.
    pub raw_name: String,
    /// `raw_name` lower-cased unless `preserve-secret-case` is set.
    pub name: String,
    /// Vault path from `agent-inject-secret-<raw>` (may be empty).
    pub path: String,
    /// Absolute destination path inside the Pod.
    pub destination: String,
    /// Template contents actually used.
    pub contents: String,
    pub perms: Option<String>,
    pub error_on_missing_key: bool,
    pub left_delim: String,
    pub right_delim: String,
}

/// Go's `strconv.ParseBool` (what `parseutil.ParseBool` ends in for strings);
/// an empty string is `false` (parseutil's weak decoding of "").
fn go_parse_bool(annotation: &str, raw: &str) -> bool {
    match raw {
        "" => false,
        "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
        "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
        other => panic!("vault-k8s would reject the Pod: {annotation}={other:?} is not a boolean"),
    }
}

/// The secrets vault-k8s derives from a Pod's annotations, following
/// `(*Agent).secrets` and `(*Agent).newTemplateConfigs` in hashicorp/vault-k8s
/// (agent-inject/agent/annotations.go and config.go):
///
/// - a secret exists for every non-empty `agent-inject-secret-<raw>`,
///   `agent-inject-template-file-<raw>` or `agent-inject-template-<raw>`;
/// - its name is the whole suffix `<raw>`, lower-cased unless
///   `preserve-secret-case[-<raw>]` is true;
/// - contents come from `agent-inject-template-<raw>`, else the default
///   template (`agent-inject-default-template`, "map" unless "json");
/// - destination is `<secret-volume-path-<raw> | secret-volume-path | /vault/secrets>/<name>`,
///   or `filepath.Join(mount, agent-inject-file-<raw>)` when that is set;
/// - `agent-inject-perms-<raw>` and `error-on-missing-key-<raw>` (default false)
///   are passed through.
pub fn injected_secrets(annotations: &BTreeMap<String, String>) -> Vec<InjectedSecret> {
    let get = |key: String| annotations.get(&key).cloned();
    let ann = |suffix: &str| format!("{PREFIX}{suffix}");

    let mount_default =
        get(ann("secret-volume-path")).unwrap_or_else(|| DEFAULT_SECRET_VOLUME_PATH.to_string());
    let default_template =
        get(ann("agent-inject-default-template")).unwrap_or_else(|| "map".to_string());

    let mut raw_names: Vec<String> = Vec::new();
    for (key, value) in annotations {
        if value.trim().is_empty() {
            continue;
        }
        for kind in [
            "agent-inject-secret-",
            "agent-inject-template-file-",
            "agent-inject-template-",
        ] {
            if let Some(raw) = key.strip_prefix(&ann(kind)) {
                if !raw.is_empty() && !raw_names.iter().any(|r| r == raw) {
                    raw_names.push(raw.to_string());
                }
                break;
            }
        }
    }

    raw_names
        .into_iter()
        .map(|raw| {
            let per = |kind: &str| get(ann(&format!("{kind}-{raw}")));
            let preserve_key = ann(&format!("preserve-secret-case-{raw}"));
            let preserve = match annotations.get(&preserve_key) {
                Some(v) => go_parse_bool(&preserve_key, v),
                None => annotations
                    .get(&ann("preserve-secret-case"))
                    .map(|v| go_parse_bool("preserve-secret-case", v))
                    .unwrap_or(false),
            };
            let name = if preserve { raw.clone() } else { raw.to_lowercase() };
            let path = per("agent-inject-secret").unwrap_or_default();

            if let Some(cmd) = per("agent-inject-command") {
                panic!("unexpected agent-inject-command-{raw}={cmd:?}: the webhook must not run commands");
            }
            let contents = match per("agent-inject-template").filter(|t| !t.is_empty()) {
                Some(t) => t,
                None => {
                    if let Some(file) = per("agent-inject-template-file") {
                        panic!("unexpected agent-inject-template-file-{raw}={file:?}: not produced by the webhook");
                    }
                    // DefaultMapTemplate / DefaultJSONTemplate in config.go.
                    match default_template.as_str() {
                        "json" => format!("{{{{ with secret \"{path}\" }}}}{{{{ .Data | toJSON }}}}\n{{{{ end }}}}"),
                        _ => format!(
                            "{{{{ with secret \"{path}\" }}}}{{{{ range $k, $v := .Data }}}}{{{{ $k }}}}: {{{{ $v }}}}\n{{{{ end }}}}{{{{ end }}}}"
                        ),
                    }
                }
            };
            let mount = per("secret-volume-path").unwrap_or_else(|| mount_default.clone());
            let destination = match per("agent-inject-file").filter(|f| !f.is_empty()) {
                // filepath.Join cleans the result; these names are plain.
                Some(file) => Path::new(&mount).join(file).to_string_lossy().into_owned(),
                None => format!("{mount}/{name}"),
            };
            let emk_key = ann(&format!("error-on-missing-key-{raw}"));
            let error_on_missing_key = go_parse_bool(&emk_key, annotations.get(&emk_key).map(String::as_str).unwrap_or(""));
            InjectedSecret {
                name,
                path,
                destination,
                contents,
                perms: per("agent-inject-perms"),
                error_on_missing_key,
                left_delim: per("agent-inject-template-left-delim").filter(|d| !d.is_empty()).unwrap_or_else(|| "{{".into()),
                right_delim: per("agent-inject-template-right-delim").filter(|d| !d.is_empty()).unwrap_or_else(|| "}}".into()),
                raw_name: raw,
            }
        })
        .collect()
}

/// `template-static-secret-render-interval`, which vault-k8s copies unparsed
/// into `template_config.static_secret_render_interval` of both agent
/// configurations when it is not empty (agent-inject/agent/agent.go `New`,
/// config.go `newConfig`).
pub fn render_interval(annotations: &BTreeMap<String, String>) -> Option<String> {
    annotations
        .get(&format!("{PREFIX}template-static-secret-render-interval"))
        .filter(|v| !v.is_empty())
        .cloned()
}

/// Where an absolute in-Pod path lands in the test's stand-in for the Pod's
/// filesystem.
pub fn host_path(pod_root: &Path, in_pod: &str) -> PathBuf {
    pod_root.join(in_pod.trim_start_matches('/'))
}

/// The agent configuration vault-k8s renders (as JSON) for the init container
/// (`newConfig(init=true)`: `exit_after_auth`, a file sink, one `template` per
/// secret with `error_on_missing_key` when its annotation says so,
/// `template_config.exit_on_retry_failure` = vault-k8s' default true and
/// `static_secret_render_interval` from [`render_interval`]), with
/// destinations moved under `pod_root`. [`sidecar_config`] makes it the
/// sidecar's.
///
/// The one deliberate difference from production: vault-k8s configures
/// `auto_auth.method "kubernetes"` (mount_path = `auth-path`, config.role =
/// `role`), which needs a Kubernetes API server to review the ServiceAccount
/// token. Here it is replaced by `method "token_file"` reading the dev server's
/// root token from `token_file`. Authentication is not what these tests are
/// about; what is read and how it is rendered is identical.
pub fn agent_config(
    vault_addr: &str,
    secrets: &[InjectedSecret],
    render_interval: Option<&str>,
    pod_root: &Path,
    token_file: &Path,
    work: &Path,
) -> Value {
    let templates: Vec<Value> = secrets
        .iter()
        .map(|s| {
            let mut t = json!({
                "destination": host_path(pod_root, &s.destination),
                "contents": s.contents,
                "left_delimiter": s.left_delim,
                "right_delimiter": s.right_delim,
            });
            if let Some(perms) = &s.perms {
                t["perms"] = json!(perms);
            }
            if s.error_on_missing_key {
                t["error_on_missing_key"] = json!(true);
            }
            t
        })
        .collect();
    let mut template_config = json!({ "exit_on_retry_failure": true });
    if let Some(interval) = render_interval {
        template_config["static_secret_render_interval"] = json!(interval);
    }
    json!({
        "auto_auth": {
            "method": {
                "type": "token_file",
                "config": { "token_file_path": token_file }
            },
            "sink": [{ "type": "file", "config": { "path": work.join(".vault-token") } }]
        },
        "exit_after_auth": true,
        "pid_file": work.join(".pid"),
        "vault": { "address": vault_addr },
        "template": templates,
        "template_config": template_config
    })
}

/// The `vault-agent` sidecar's configuration (`newConfig(init=false)`): the
/// init container's, but the agent keeps running and re-rendering.
pub fn sidecar_config(init: &Value) -> Value {
    let mut config = init.clone();
    config["exit_after_auth"] = json!(false);
    config
}

/// Runs `bao agent -config=<config>` against `dev` until it exits (at most
/// `AGENT_TIMEOUT`), and panics with the agent's output unless it exits 0.
pub fn run_agent(dev: &BaoDev, config: &Value, work: &Path) -> Output {
    let out = run_with_timeout(agent_command(dev, config, work), None, work, AGENT_TIMEOUT);
    assert!(
        out.status.success(),
        "bao agent failed\n{}\n--- agent config ---\n{}\n--- server log ---\n{}",
        out.describe(),
        serde_json::to_string_pretty(config).unwrap(),
        dev.server_log()
    );
    out
}

/// Starts `bao agent` (a sidecar: it runs until killed) with its output in
/// `work/sidecar.log`; killed when the guard is dropped.
pub fn spawn_agent(dev: &BaoDev, config: &Value, work: &Path) -> (ChildGuard, PathBuf) {
    let log = work.join("sidecar.log");
    let out = fs::File::create(&log).expect("creating the sidecar log");
    let err = out.try_clone().expect("cloning the sidecar log handle");
    let mut cmd = agent_command(dev, config, work);
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start bao agent: {e}"));
    (ChildGuard::new(child), log)
}

fn agent_command(dev: &BaoDev, config: &Value, work: &Path) -> Command {
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let config_path = work.join(format!("agent-{n}.json"));
    fs::write(&config_path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut cmd = dev.command();
    // The agent must authenticate through auto_auth, not an inherited token.
    cmd.env_remove("BAO_TOKEN")
        .arg("agent")
        .arg(format!("-config={}", config_path.display()));
    cmd
}

/// All regular files under `root`, as paths relative to it.
pub fn list_files(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Describes the first difference between two byte strings.
pub fn diff_bytes(expected: &[u8], actual: &[u8]) -> String {
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    let window = |b: &[u8]| {
        let s = first.saturating_sub(20);
        let e = (first + 20).min(b.len());
        format!("{:?}", String::from_utf8_lossy(&b[s.min(e)..e]))
    };
    format!(
        "expected {} bytes, got {}; first difference at byte {first}: expected …{}… got …{}…\n\
         expected (escaped): {:?}\nactual   (escaped): {:?}",
        expected.len(),
        actual.len(),
        window(expected),
        window(actual),
        String::from_utf8_lossy(expected),
        String::from_utf8_lossy(actual),
    )
}
