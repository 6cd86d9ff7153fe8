//! Running a stored Pod's containers the way a kubelet would, without a kubelet or images.
//!
//! A [`Sandbox`] is a private mount namespace (`unshare --mount`, root only) whose root is an
//! overlay of the host's `/`: the process sees the host's binaries and libraries, but the
//! absolute paths a container expects (`/vault/secrets`, `/home/vault`,
//! `/var/run/secrets/kubernetes.io/serviceaccount`) are bind mounts of directories of the test,
//! and whatever it writes elsewhere lands in a throw-away upper layer. Nothing on the host
//! changes. A [`PodFiles`] materializes a stored Pod's volumes (emptyDirs shared by its
//! containers, projected ServiceAccount tokens bound to the Pod, Secrets and ConfigMaps read
//! from the API server) and turns one container's command, args, env and volumeMounts into a
//! sandboxed command.

// Shared by several test files, each of which uses a part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;

use super::kube::ControlPlane;

/// The PATH of the upstream images (distroless and alpine alike).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the mounts, mount namespace and chroot; `$1` is the scratch directory, then pairs of
/// `HOST-PATH SANDBOX-PATH` for bind mounts, `--`, pairs of `LINK TARGET` for symlinks, `--`,
/// the working directory, and the command. Directories (or files) to mount on are created inside
/// the overlay, resolving symlinks such as /var/run -> /run there, not on the host.
const SANDBOX_SCRIPT: &str = r#"
set -eu
r=$1; shift
mount -t tmpfs -o mode=0755 ivw-sandbox "$r"
mkdir "$r/upper" "$r/work" "$r/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$r/upper,workdir=$r/work" "$r/root"
mount --rbind /dev "$r/root/dev"
mount --rbind /proc "$r/root/proc"
mount --rbind /sys "$r/root/sys"
while [ "$1" != -- ]; do
  src=$1 dst=$2; shift 2
  if [ -d "$src" ]; then
    dst=$(chroot "$r/root" sh -c 'mkdir -p "$1" && readlink -f "$1"' _ "$dst")
  else
    dst=$(chroot "$r/root" sh -c 'mkdir -p "$(dirname "$1")" && touch "$1" && readlink -f "$1"' _ "$dst")
  fi
  mount --bind "$src" "$r/root$dst"
done
shift
while [ "$1" != -- ]; do
  chroot "$r/root" sh -c 'mkdir -p "$(dirname "$1")" && ln -sfn "$2" "$1"' _ "$1" "$2"
  shift 2
done
shift
cwd=$1; shift
exec chroot "$r/root" sh -c 'cd "$1" && shift && exec "$@"' _ "$cwd" "$@"
"#;

/// A process's view of the file system: bind mounts and symlinks over an overlay of `/`.
#[derive(Default, Clone)]
pub struct Sandbox {
    /// (host path, path inside the sandbox)
    pub mounts: Vec<(PathBuf, String)>,
    /// (path inside the sandbox, what it points to)
    pub links: Vec<(String, PathBuf)>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
}

impl Sandbox {
    pub fn mount(mut self, host: impl Into<PathBuf>, inside: &str) -> Self {
        self.mounts.push((host.into(), inside.to_string()));
        self
    }

    pub fn link(mut self, inside: &str, target: impl Into<PathBuf>) -> Self {
        self.links.push((inside.to_string(), target.into()));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_string(), value.into());
        self
    }

    /// `argv` run in the sandbox; `scratch` (an empty directory the test owns) holds its overlay.
    pub fn command(&self, scratch: &Path, argv: &[String]) -> Command {
        fs::create_dir_all(scratch).unwrap_or_else(|e| panic!("{}: {e}", scratch.display()));
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            SANDBOX_SCRIPT,
            "sandbox",
        ])
        .arg(scratch);
        for (host, inside) in &self.mounts {
            cmd.arg(host).arg(inside);
        }
        cmd.arg("--");
        for (inside, target) in &self.links {
            cmd.arg(inside).arg(target);
        }
        cmd.arg("--");
        cmd.arg(if self.cwd.is_empty() { "/" } else { &self.cwd });
        cmd.args(argv);
        cmd.env_clear().env("PATH", IMAGE_PATH).envs(&self.env);
        cmd
    }
}

/// A stored Pod's volumes on the host, ready to be mounted into its containers.
pub struct PodFiles {
    pub pod: Value,
    pub dir: PathBuf,
    volumes: BTreeMap<String, PathBuf>,
    api_port: u16,
}

impl PodFiles {
    /// Materializes every volume of `pod` (as stored by the API server) under `dir`.
    pub fn new(cp: &ControlPlane, pod: Value, dir: &Path) -> Self {
        let meta = &pod["metadata"];
        let name = str_at(meta, "name");
        let namespace = str_at(meta, "namespace");
        let sa = str_at(&pod["spec"], "serviceAccountName");
        let mut volumes = BTreeMap::new();
        for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let vname = str_at(volume, "name");
            let path = dir.join("volumes").join(&vname);
            fs::create_dir_all(&path).unwrap();
            if let Some(projected) = volume.get("projected") {
                for source in projected["sources"].as_array().into_iter().flatten() {
                    if let Some(t) = source.get("serviceAccountToken") {
                        // What the kubelet asks TokenRequest for: a token bound to this Pod.
                        let audience = t.get("audience").and_then(Value::as_str);
                        let token = cp.token(&namespace, &sa, Some(&name), audience);
                        fs::write(path.join(str_at(t, "path")), token).unwrap();
                    } else if let Some(cm) = source.get("configMap") {
                        write_items(&path, cm, &config_map_data(cp, &namespace, cm));
                    } else if let Some(d) = source.get("downwardAPI") {
                        for item in d["items"].as_array().into_iter().flatten() {
                            let value =
                                field_ref(&pod, str_at(&item["fieldRef"], "fieldPath").as_str());
                            fs::write(path.join(str_at(item, "path")), value).unwrap();
                        }
                    } else {
                        panic!("{namespace}/{name}: projected source not supported here: {source}");
                    }
                }
            } else if let Some(secret) = volume.get("secret") {
                let data = object_data(
                    cp,
                    &namespace,
                    "secret",
                    &str_at(secret, "secretName"),
                    secret,
                    true,
                );
                write_items(&path, secret, &data);
            } else if let Some(cm) = volume.get("configMap") {
                write_items(&path, cm, &config_map_data(cp, &namespace, cm));
            } else if volume.get("emptyDir").is_none() {
                panic!("{namespace}/{name}: volume type not supported here: {volume}");
            }
            volumes.insert(vname, path);
        }
        Self {
            pod,
            dir: dir.to_path_buf(),
            volumes,
            api_port: cp.port,
        }
    }

    pub fn name(&self) -> String {
        str_at(&self.pod["metadata"], "name")
    }

    /// The host directory behind volume `name`.
    pub fn volume(&self, name: &str) -> &Path {
        self.volumes
            .get(name)
            .unwrap_or_else(|| panic!("{}: no volume {name}", self.name()))
    }

    /// The container (or init container) `name` of the Pod.
    pub fn container(&self, name: &str) -> &Value {
        let spec = &self.pod["spec"];
        spec["initContainers"]
            .as_array()
            .into_iter()
            .chain(spec["containers"].as_array())
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{}: no container {name} in {spec}", self.name()))
    }

    /// The sandbox for container `name`: its volumeMounts and its env resolved as the kubelet
    /// does (downward API fields, resource fields), plus the Service env of `kubernetes`.
    pub fn sandbox(&self, name: &str) -> Sandbox {
        let container = self.container(name);
        let mut sandbox = Sandbox {
            cwd: container["workingDir"].as_str().unwrap_or("/").to_string(),
            ..Sandbox::default()
        };
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let mut host = self.volume(&str_at(mount, "name")).to_path_buf();
            if let Some(sub) = mount.get("subPath").and_then(Value::as_str) {
                host = host.join(sub);
            }
            sandbox = sandbox.mount(host, &str_at(mount, "mountPath"));
        }
        assert!(
            container.get("envFrom").is_none(),
            "{name}: envFrom is not supported here"
        );
        sandbox = sandbox
            .env("HOSTNAME", self.name())
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", self.api_port.to_string());
        for var in container["env"].as_array().into_iter().flatten() {
            let key = str_at(var, "name");
            let value = if let Some(from) = var.get("valueFrom") {
                if let Some(f) = from.get("fieldRef") {
                    field_ref(&self.pod, &str_at(f, "fieldPath"))
                } else if let Some(r) = from.get("resourceFieldRef") {
                    resource_field(container, r)
                } else {
                    panic!("{name}: env {key}: valueFrom not supported here: {from}");
                }
            } else {
                var["value"].as_str().unwrap_or("").to_string()
            };
            sandbox = sandbox.env(&key, value);
        }
        sandbox
    }

    /// The container's command line: `command` (or the image's entrypoint) then `args`.
    pub fn argv(&self, name: &str, entrypoint: &[&str]) -> Vec<String> {
        let container = self.container(name);
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        };
        let mut argv = strings(&container["command"]);
        if argv.is_empty() {
            argv = entrypoint.iter().map(|s| s.to_string()).collect();
        }
        argv.extend(strings(&container["args"]));
        argv
    }
}

pub fn str_at(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
        .to_string()
}

/// The downward API fields a Pod's env or volumes use.
fn field_ref(pod: &Value, path: &str) -> String {
    match path {
        "metadata.name" => str_at(&pod["metadata"], "name"),
        "metadata.namespace" => str_at(&pod["metadata"], "namespace"),
        "metadata.uid" => str_at(&pod["metadata"], "uid"),
        "spec.serviceAccountName" => str_at(&pod["spec"], "serviceAccountName"),
        "spec.nodeName" => "node-1".to_string(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
        other => panic!("fieldRef {other} is not supported here"),
    }
}

/// `resourceFieldRef`: the container's limit or request divided by `divisor`, rounded up; an
/// unset limit reads as the node's allocatable, as in the kubelet (here: this machine's CPUs).
fn resource_field(container: &Value, r: &Value) -> String {
    let resource = str_at(r, "resource");
    let (kind, what) = resource.split_once('.').unwrap_or(("limits", &resource));
    let quantity = container["resources"][kind][what].as_str();
    match what {
        "cpu" => {
            let cores = match quantity {
                Some(q) => q
                    .strip_suffix('m')
                    .map(|m| m.parse::<f64>().unwrap() / 1000.0)
                    .unwrap_or_else(|| q.parse().unwrap()),
                None => std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            };
            let divisor = r["divisor"].as_str().unwrap_or("1");
            let divisor = divisor
                .strip_suffix('m')
                .map(|m| m.parse::<f64>().unwrap() / 1000.0)
                .unwrap_or_else(|| divisor.parse().unwrap());
            format!("{}", (cores / divisor).ceil() as u64)
        }
        other => panic!("resourceFieldRef {other} is not supported here"),
    }
}

/// ConfigMap data; `kube-root-ca.crt` is what kube-controller-manager's root-ca-cert-publisher
/// would have put in every namespace (there is no controller-manager here).
fn config_map_data(cp: &ControlPlane, namespace: &str, cm: &Value) -> BTreeMap<String, Vec<u8>> {
    let name = str_at(cm, "name");
    if name == "kube-root-ca.crt" {
        return BTreeMap::from([("ca.crt".to_string(), cp.ca.cert_pem.clone().into_bytes())]);
    }
    object_data(cp, namespace, "configmap", &name, cm, false)
}

fn object_data(
    cp: &ControlPlane,
    namespace: &str,
    kind: &str,
    name: &str,
    source: &Value,
    base64: bool,
) -> BTreeMap<String, Vec<u8>> {
    let out = cp.kubectl_output(&["get", kind, name, "-n", namespace, "-o", "json"], None);
    if !out.status.success() {
        assert!(
            source["optional"] == true,
            "{kind} {namespace}/{name} is not optional and does not exist: {}",
            out.describe()
        );
        return BTreeMap::new();
    }
    let object: Value = serde_json::from_slice(&out.stdout).unwrap();
    object["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let s = v.as_str().unwrap_or_default();
            let bytes = if base64 {
                base64::engine::general_purpose::STANDARD.decode(s).unwrap()
            } else {
                s.as_bytes().to_vec()
            };
            (k.clone(), bytes)
        })
        .collect()
}

fn write_items(dir: &Path, source: &Value, data: &BTreeMap<String, Vec<u8>>) {
    match source["items"].as_array() {
        Some(items) => {
            for item in items {
                if let Some(bytes) = data.get(&str_at(item, "key")) {
                    fs::write(dir.join(str_at(item, "path")), bytes).unwrap();
                }
            }
        }
        None => {
            for (key, bytes) in data {
                fs::write(dir.join(key), bytes).unwrap();
            }
        }
    }
}
