//! `check` and `render` as a user runs them: the real binary, real files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_istio-vault-webhook");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start binary");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        // A command that fails early (a bad config) exits without reading
        // its input; the broken pipe is then expected, not a test failure.
        if let Err(e) = input.write_all(bytes) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe,
                "writing stdin: {e}"
            );
        }
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    p.display().to_string()
}

fn example() -> String {
    repo("src/example-config.yaml").display().to_string()
}

#[test]
fn check_accepts_good_configs_and_configmaps() {
    let dir = tempfile::tempdir().unwrap();
    let cm = write(
        &dir,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: istio-vault-webhook }\ndata:\n  config.yaml: |\n    cluster: c2\n    vault: { authPath: auth/kubernetes-cluster2 }\n    profiles:\n      istiod: { secretPath: kubernetes-cluster2-secrets/istiod-service/certs }\n",
    );
    let out = run(&["check", &example(), &cm], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ok (cluster cluster1, profiles: istiod, ingressgateway"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok (cluster c2, profiles: istiod"),
        "{stdout}"
    );
}

#[test]
fn check_names_the_field_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "bad.yaml",
        "cluster: c\nvault: { authPath: auth/k, kvVersion: 3 }\nprofiles:\n  istiod: { secretPath: m/p, files: { ca-key.pem: ca_key } }\n",
    );
    let typo = write(
        &dir,
        "typo.yaml",
        "cluster: c\nvault: { authPath: auth/k, adress: x }\n",
    );
    let out = run(
        &["check", &example(), &bad, &typo, "/nonexistent.yaml"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.yaml: vault.kvVersion: must be 1 or 2, got 3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.yaml: profiles.istiod.files:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("typo.yaml") && stderr.contains("unknown field `adress`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("/nonexistent.yaml: cannot read"),
        "{stderr}"
    );
    // The good file is still reported as good.
    assert!(text(&out.stdout).contains("example-config.yaml: ok"));
}

#[test]
fn render_mutates_a_deployment_and_passes_other_kinds() {
    let out = run(
        &[
            "render",
            "--config",
            &example(),
            &repo("tests/fixtures/workloads/multi.yaml")
                .display()
                .to_string(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text(&out.stdout))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "Deployment"]);
    let istiod = &docs[0]["spec"]["template"];
    assert_eq!(
        istiod["metadata"]["annotations"]["istio-vault-webhook/profile"],
        "istiod"
    );
    let env = istiod["spec"]["containers"][0]["env"].as_array().unwrap();
    let root: Vec<&Value> = env.iter().filter(|e| e["name"] == "ROOT_CA_DIR").collect();
    assert_eq!(root.len(), 1);
    assert_eq!(root[0]["value"], "/vault/secrets");
    assert!(
        docs[1]["metadata"]
            .get("annotations")
            .is_none_or(|a| a.get("istio-vault-webhook/profile").is_none())
    );
    let gw = &docs[2]["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(gw["istio-vault-webhook/profile"], "ingressgateway");
}

#[test]
fn render_patch_reads_stdin_and_prints_one_patch_per_document() {
    let pod = std::fs::read(repo("tests/fixtures/pods/istiod.json")).unwrap();
    let out = run(&["render", "--patch", "--config", &example()], Some(&pod));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let patch: json_patch::Patch = serde_json::from_str(lines[0]).unwrap();
    let mut doc: Value = serde_json::from_slice(&pod).unwrap();
    json_patch::patch(&mut doc, &patch).unwrap();
    assert_eq!(
        doc["metadata"]["annotations"]["vault.hashicorp.com/agent-inject"],
        "true"
    );
}

#[test]
fn render_of_its_own_output_changes_nothing() {
    let workload = repo("tests/fixtures/workloads/istiod-deployment.yaml")
        .display()
        .to_string();
    let first = run(&["render", "--config", &example(), &workload], None);
    assert!(first.status.success());
    let second = run(
        &["render", "--patch", "--config", &example()],
        Some(&first.stdout),
    );
    assert!(second.status.success());
    assert_eq!(text(&second.stdout).trim(), "[]");
}

#[test]
fn render_reports_denials_with_exit_1() {
    let pod =
        std::fs::read_to_string(repo("tests/fixtures/pods/istiod-renamed-container.json")).unwrap();
    let out = run(&["render", "--config", &example()], Some(pod.as_bytes()));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("denied:") && stderr.contains("\"discovery\""),
        "{stderr}"
    );
}

#[test]
fn render_rejects_a_bad_config_or_input() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir, "bad.yaml", "cluster: c\n");
    let out = run(&["render", "--config", &bad], Some(b"kind: Pod\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bad.yaml"));
    let out = run(
        &["render", "--config", &example()],
        Some(b"kind: Deployment\nspec: [\n"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("stdin"), "{}", text(&out.stderr));
}

#[test]
fn serve_refuses_zero_workers_before_starting() {
    let out = run(&["serve", "--workers", "0"], None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--workers"),
        "{}",
        text(&out.stderr)
    );
}
