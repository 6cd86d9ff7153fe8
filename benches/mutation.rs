//! The admission hot path: AdmissionReview bytes in, response bytes out
//! (`admission::review`), for the Pods the webhook sees in a cluster and for
//! Pods scaled from ~1 KiB to ~1 MiB to show the cost is linear in the size.
//!
//! `cargo bench --bench mutation` (add `-- --quick` for a fast pass).
//! The reviews in `benches/fixtures/` are what the API server sends for the
//! upstream charts' Pods after defaulting (compact JSON, as Go writes it).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use istio_vault_webhook::admission;
use istio_vault_webhook::config::{Config, EXAMPLE_CONFIG};
use istio_vault_webhook::mutate::{ConfigState, Outcome};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISTIOD: &str = include_str!("fixtures/istiod-review.json");
/// The istiod Pod of `tests/fixtures/pods/istiod.json` (rendered from the
/// Istio charts) in a review, keys in the order the API server writes them.
const ISTIOD_CHART: &str = include_str!("fixtures/istiod-chart-review.json");
const GATEWAY: &str = include_str!("fixtures/gateway-review.json");
const UNRELATED: &str = include_str!("fixtures/unrelated-review.json");

fn config() -> Config {
    Config::parse(EXAMPLE_CONFIG).expect("example config is valid")
}

fn outcome(body: &[u8], cfg: &Config) -> Outcome {
    admission::review(body, ConfigState::Loaded(cfg))
        .expect("fixture is a valid review")
        .outcome()
}

/// An istiod Pod CREATE review padded with extra containers (env lists) and
/// annotations until its body is at least `target` bytes.
fn scaled_review(target: usize) -> Vec<u8> {
    let mut review: Value = serde_json::from_str(ISTIOD).unwrap();
    let object = &mut review["request"]["object"];
    // Start from a small istiod Pod: the labels that match and the container.
    *object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "istiod-5f4d8c9b7d-",
            "namespace": "istio-system",
            "labels": {"app": "istiod", "istio.io/rev": "default"},
            "annotations": {"prometheus.io/scrape": "true"}
        },
        "spec": {"containers": [{
            "name": "discovery",
            "image": "docker.io/istio/pilot:1.28.0",
            "env": [{"name": "REVISION", "value": "default"}]
        }]}
    });
    let mut i = 0;
    while serde_json::to_vec(&review).unwrap().len() < target {
        let object = &mut review["request"]["object"];
        object["metadata"]["annotations"][format!("example.com/note-{i}")] =
            Value::String(format!("value {i} of a padding annotation"));
        let env: Vec<Value> = (0..8)
            .map(|j| json!({"name": format!("VAR_{i}_{j}"), "value": format!("value-{i}-{j}")}))
            .collect();
        object["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({
                "name": format!("helper-{i}"),
                "image": "registry.example.com/helper:1.0",
                "args": ["--port", "9000", "--verbose"],
                "env": env,
            }));
        i += 1;
    }
    serde_json::to_vec(&review).unwrap()
}

fn fixtures(c: &mut Criterion) {
    let cfg = config();
    let mut group = c.benchmark_group("review");
    for (name, body, expect) in [
        ("istiod", ISTIOD, Outcome::Patched),
        ("istiod-chart", ISTIOD_CHART, Outcome::Patched),
        ("gateway", GATEWAY, Outcome::Patched),
        ("unrelated", UNRELATED, Outcome::Skipped),
    ] {
        let body = body.as_bytes();
        assert_eq!(outcome(body, &cfg), expect, "{name}");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| admission::review(black_box(body), ConfigState::Loaded(&cfg)))
        });
    }
    group.finish();
}

fn scaled(c: &mut Criterion) {
    let cfg = config();
    let mut group = c.benchmark_group("review-scaled");
    for kib in [1, 4, 16, 64, 256, 1024] {
        let body = scaled_review(kib * 1024);
        assert_eq!(outcome(&body, &cfg), Outcome::Patched);
        if kib >= 256 {
            group.sample_size(20);
        }
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &body,
            |b, body| b.iter(|| admission::review(black_box(body), ConfigState::Loaded(&cfg))),
        );
    }
    group.finish();
}

criterion_group!(benches, fixtures, scaled);

/// `IVW_BENCH_LOOP=<istiod|istiod-chart|gateway|unrelated|KiB>:<n>` runs `n` reviews and
/// exits instead of benchmarking: a steady loop for callgrind or perf, e.g.
/// `IVW_BENCH_LOOP=istiod:1000 valgrind --tool=callgrind <bench binary>`.
fn profile_loop(spec: &str) {
    let (what, n) = spec.split_once(':').unwrap_or((spec, "1000"));
    let n: usize = n.parse().expect("IVW_BENCH_LOOP count");
    let body = match what {
        "istiod" => ISTIOD.as_bytes().to_vec(),
        "gateway" => GATEWAY.as_bytes().to_vec(),
        "unrelated" => UNRELATED.as_bytes().to_vec(),
        "istiod-chart" => ISTIOD_CHART.as_bytes().to_vec(),
        kib => scaled_review(kib.parse::<usize>().expect("IVW_BENCH_LOOP size") * 1024),
    };
    let cfg = config();
    let mut total = 0;
    let mut last = Vec::new();
    for _ in 0..n {
        last = admission::review(black_box(&body), ConfigState::Loaded(&cfg))
            .unwrap()
            .body;
        total += last.len();
    }
    println!(
        "{n} reviews of {} bytes, {total} response bytes",
        body.len()
    );
    // IVW_BENCH_OUT=file keeps the last response, to compare before/after.
    if let Ok(path) = std::env::var("IVW_BENCH_OUT") {
        std::fs::write(path, last).unwrap();
    }
}

fn main() {
    if let Ok(spec) = std::env::var("IVW_BENCH_LOOP") {
        profile_loop(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
