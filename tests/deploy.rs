//! deploy/ cannot rot: every Kubernetes manifest (the base and each overlay,
//! rendered by kustomize) validates against the Kubernetes 1.29 schemas
//! offline and holds what an operator relies on; the alert rules pass
//! `promtool check rules` and their unit tests; the dashboard is valid JSON;
//! every metric name the alerts and the dashboard use exists in a live
//! sidecar's /metrics; and the Dockerfile builds what `make release` builds.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Mock, Sidecar};
use serde_json::{Value, json};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Runs a tool the CI installs; its absence is a failure, not a skip.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (.ci/run installs it)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize DIR`, validated, as JSON documents.
fn render(overlay: &str) -> Vec<Value> {
    let dir = deploy().join("kubernetes").join(overlay);
    let yaml = run(
        Command::new("kubectl").arg("kustomize").arg(&dir),
        &format!("kubectl kustomize {overlay}"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    // Offline, strict (unknown fields are errors), Kubernetes 1.29: the
    // first version with native sidecars.
    let report = run(
        Command::new("kubernetes-validate")
            .args(["-k", "1.29.0", "--strict"])
            .arg(&file),
        &format!("kubernetes-validate {overlay}"),
    );
    assert!(!report.contains("ERROR"), "{overlay}: {report}");
    let json = run(
        Command::new("python3")
            .args([
                "-c",
                // Secrets also get their values decoded, as `decoded`.
                "import base64, json, sys, yaml\n\
                 docs = [d for d in yaml.safe_load_all(sys.stdin) if d]\n\
                 for d in docs:\n\
                 \x20   if d['kind'] == 'Secret':\n\
                 \x20       d['decoded'] = {k: base64.b64decode(v).decode() for k, v in d.get('data', {}).items()}\n\
                 print(json.dumps(docs))",
            ])
            .stdin(std::fs::File::open(&file).unwrap()),
        "YAML to JSON",
    );
    serde_json::from_str(&json).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// The base's Secret holding ADMIN_TOKEN.
fn admin_secret(docs: &[Value]) -> Value {
    docs.iter()
        .find(|d| d["kind"] == "Secret" && d["data"]["ADMIN_TOKEN"].is_string())
        .expect("a Secret with ADMIN_TOKEN")
        .clone()
}

#[test]
fn the_base_is_a_valid_pod_with_a_native_sidecar() {
    let docs = render("base");
    let dep = kind(&docs, "Deployment", "rag-services");
    let pod = &dep["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(sidecar["name"], "rag-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["ports"][0]["containerPort"], 5003);
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sidecar["resources"]["limits"]["memory"].is_string());
    assert!(sidecar["resources"]["requests"]["memory"].is_string());
    // Longer than shutdown_grace (25 s), so in-flight requests finish.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 25);
    // The app and the sidecar's configuration.
    assert_eq!(pod["containers"][0]["name"], "app");
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["rag-sidecar.toml"].is_string())
        .expect("the config map");
    let toml = cm["data"]["rag-sidecar.toml"].as_str().unwrap();
    let env = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["MAX_RETRIES"].is_string())
        .expect("the legacy .env values");
    // The shipped file and environment load with the sidecar's own loader.
    let pairs: Vec<(&str, &str)> = env["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
        .collect();
    let cfg = common::config(toml, &pairs);
    assert_eq!(cfg.listen.port(), 5003);
    assert_eq!(cfg.upstream.to_string(), "http://127.0.0.1:5000");
    assert_eq!(cfg.circuit_breaker.threshold, 5);
    assert_eq!(cfg.shutdown_grace.as_secs(), 25);
    // Under a read-only root, the spool (request_buffering) writes to a
    // /tmp volume that holds spool_max_bytes.
    let tmp = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/tmp")
        .expect("a writable /tmp for the spool");
    assert_ne!(tmp["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == tmp["name"])
        .expect("the /tmp volume");
    assert_eq!(volume["emptyDir"]["sizeLimit"], "1Gi");
    assert_eq!(
        cfg.spool_max_bytes,
        1 << 30,
        "the volume holds the whole spool"
    );
    // The admin token comes from a Secret (with it, every caller needs it,
    // a mesh's loopback proxy included).
    let token_ref = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ADMIN_TOKEN")
        .expect("ADMIN_TOKEN in the sidecar's env")["valueFrom"]["secretKeyRef"]
        .clone();
    let admin = admin_secret(&docs);
    assert_eq!(token_ref["name"], admin["metadata"]["name"]);
    assert_eq!(token_ref["key"], "ADMIN_TOKEN");
    assert!(
        admin["decoded"]["ADMIN_TOKEN"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    // Service and scraping.
    let svc = kind(&docs, "Service", "rag-services");
    assert_eq!(svc["spec"]["ports"][0]["port"], 5003);
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "5003");
    let pm = kind(&docs, "PodMonitor", "rag-services");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "http");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the PodMonitor selects the pods");
    }
}

#[test]
fn the_redis_overlay_adds_redis_and_secrets() {
    let docs = render("overlays/redis");
    kind(&docs, "Deployment", "redis");
    assert_eq!(
        kind(&docs, "Service", "redis")["spec"]["ports"][0]["port"],
        6379
    );
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["data"]["REDIS_PASSWORD"].is_string())
        .expect("a Secret with REDIS_PASSWORD");
    let admin = admin_secret(&docs);
    let env = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["USE_REDIS"].is_string())
        .expect("USE_REDIS");
    assert_eq!(env["data"]["USE_REDIS"], "True");
    assert_eq!(
        env["data"]["MAX_RETRIES"], "3",
        "merged with the base's values"
    );
    // The sidecar, given what the pod gives it, uses that Redis with that
    // password, and has an admin token.
    let toml = docs
        .iter()
        .find_map(|d| d["data"]["rag-sidecar.toml"].as_str())
        .unwrap();
    let mut vars: Vec<(String, String)> = Vec::new();
    for map in [&env["data"], &secret["decoded"], &admin["decoded"]] {
        for (k, v) in map.as_object().unwrap() {
            vars.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cfg = common::config(toml, &pairs);
    let password = secret["decoded"]["REDIS_PASSWORD"].as_str().unwrap();
    assert_eq!(
        cfg.redis.url.as_deref(),
        Some(format!("redis://:{password}@redis:6379/0").as_str())
    );
    assert_eq!(
        cfg.admin_token.as_deref(),
        admin["decoded"]["ADMIN_TOKEN"].as_str()
    );
    let dep = kind(&docs, "Deployment", "rag-services");
    let from = &dep["spec"]["template"]["spec"]["initContainers"][0]["envFrom"];
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert!(
        from.as_array()
            .unwrap()
            .iter()
            .any(|f| f["secretRef"]["name"] == secret_name),
        "{from}"
    );
}

#[test]
fn the_ha_overlay_runs_three_replicas_with_a_disruption_budget() {
    let docs = render("overlays/ha");
    assert_eq!(
        kind(&docs, "Deployment", "rag-services")["spec"]["replicas"],
        3
    );
    let pdb = kind(&docs, "PodDisruptionBudget", "rag-services");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
}

#[test]
fn the_tracing_overlay_points_the_sidecar_at_a_collector() {
    let docs = render("overlays/tracing");
    let deployment = kind(&docs, "Deployment", "rag-services");
    let sidecar = deployment["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rag-sidecar")
        .expect("the sidecar container");
    let env = sidecar["env"].as_array().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {name} in {env:?}"))
    };
    let endpoint = value("OTEL_EXPORTER_OTLP_ENDPOINT");
    assert!(endpoint.starts_with("http://") && endpoint.ends_with(":4318"));
    assert_eq!(value("OTEL_TRACES_SAMPLER"), "parentbased_traceidratio");
    // The base's variables are kept beside them.
    for kept in ["NUM_THREADS", "ADMIN_TOKEN"] {
        assert!(env.iter().any(|e| e["name"] == kept), "{kept} lost");
    }
    // $(POD_NAME) expands only if it is defined before its use.
    let at = |name: &str| env.iter().position(|e| e["name"] == name).unwrap();
    assert!(at("POD_NAME") < at("OTEL_RESOURCE_ATTRIBUTES"));
}

#[test]
fn the_validator_catches_a_broken_manifest() {
    // A check that cannot fail is no check: a typo'd field must be refused.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {prots: [{port: 1}]}\n",
    )
    .unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["-k", "1.29.0", "--strict"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate");
    assert!(!out.status.success());
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    let dir = deploy().join("prometheus");
    run(
        Command::new("promtool")
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
        "promtool check rules",
    );
    run(
        Command::new("promtool")
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(&dir),
        "promtool test rules",
    );
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    for alert in [
        "RagSidecarUnhealthy",
        "RagSidecarHighCPU",
        "RagSidecarHighMemory",
        "RagSidecarHighErrorRate",
        "RagSidecarCircuitOpen",
        "RagSidecarRedisDown",
        "RagSidecarHigh429Rate",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}

/// Every `rag_sidecar_*` name in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("rag_sidecar_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
            .unwrap_or(name);
        names.insert(base.to_string());
        i = end;
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_exists() {
    let dashboard = std::fs::read_to_string(deploy().join("grafana/rag-sidecar.json")).unwrap();
    let dash: Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(dash["panels"].as_array().unwrap().len() >= 8);
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();

    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    // A quota on `rag`, so that its series exist.
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"rag\"\nupstream_limit = \"15 per minute\"\n",
    )
    .await;
    sc.post_json("/api/search", &json!({"query": "q"})).await;
    let text = sc.get_text("/metrics").await;
    let exported = metric_names(&text);
    for (what, source) in [("alerts.yml", &rules), ("the dashboard", &dashboard)] {
        let used = metric_names(source);
        assert!(used.len() >= 5, "{what}: {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{what} uses metrics /metrics lacks: {missing:?}"
        );
    }
}

#[test]
fn the_dockerfile_builds_what_make_release_builds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let df = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let froms: Vec<&str> = df.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].ends_with("AS build"), "{}", froms[0]);
    assert!(froms[1].contains("distroless"), "{}", froms[1]);
    assert!(df.contains("RUN make release"));
    // Everything cargo needs to build the workspace is in the build context.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "mock-app",
        "benches",
        "config",
    ] {
        assert!(root.join(needed).exists(), "{needed}");
        assert!(
            df.lines().any(|l| l.starts_with("COPY ")
                && !l.contains("--from")
                && l.split_whitespace()
                    .any(|w| w == needed || w.trim_end_matches('/') == needed)),
            "the Dockerfile copies {needed}"
        );
    }
    assert!(df.contains("COPY --from=build /src/target/release/rag-sidecar "));
    assert!(df.contains("COPY --from=build /src/config/rag-sidecar.toml "));
    let user = df
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "non-root: {user}"
    );
    // `make release` is a real target that builds that binary.
    let plan = run(
        Command::new("make")
            .args(["-n", "release"])
            .current_dir(root),
        "make -n release",
    );
    assert!(
        plan.contains("build") && plan.contains("--release"),
        "{plan}"
    );
    assert!(root.join("config/rag-sidecar.toml").exists());
}

/// deploy/README.md's tree names every overlay there is, so a new one is
/// not left out of the page operators read first.
#[test]
fn the_deploy_readme_tree_names_every_overlay() {
    let readme = std::fs::read_to_string(deploy().join("README.md")).unwrap();
    let tree = readme
        .split("```")
        .find(|block| block.trim_start().starts_with("deploy/"))
        .expect("deploy/README.md has no tree");
    let overlays = std::fs::read_dir(deploy().join("kubernetes/overlays")).unwrap();
    let mut seen = 0;
    for entry in overlays {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let line = format!("kubernetes/overlays/{name}/");
        assert!(tree.contains(&line), "the tree does not name {line}");
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} overlays found");
}
