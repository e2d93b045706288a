//! The deployment examples in `deploy/`: every YAML file parses, the Kubernetes and compose
//! files keep the properties the README promises, and every sidecar config they carry passes
//! `check` (its `/run/secrets/…` files stood in for by files in a temporary directory).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

use crate::support::{repo_root, run_binary};

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files(extensions: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(&repo_root().join("deploy"), &mut files);
    files.retain(|f| f.extension().is_some_and(|e| extensions.iter().any(|x| e == *x)));
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// `check` on a sidecar config, with each `/run/secrets/…` file it names made in a temporary
/// directory.
fn check_config(text: &str, origin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let text = text.replace("/run/secrets/", &format!("{}/", secrets.display()));
    for line in text.lines() {
        if let Some((_, rest)) = line.split_once("{ file = \"") {
            let file = PathBuf::from(rest.split('"').next().unwrap());
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, "example-secret\n").unwrap();
        }
    }
    if text.contains("ca_file = \"ca.pem\"") {
        let pki = token_sidecar::dev::certs::TestPki::new().unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    }
    let config = dir.path().join("sidecar.toml");
    std::fs::write(&config, text).unwrap();
    let (code, stdout, stderr) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{origin}: {stderr}");
    assert!(stdout.starts_with("config OK"), "{origin}: {stdout}");
}

#[test]
fn every_yaml_file_parses_and_every_embedded_config_passes_check() {
    let yaml = deploy_files(&["yaml", "yml"]);
    assert!(yaml.len() >= 2, "Kubernetes and compose examples: {yaml:?}");
    let mut configs = 0;
    for file in &yaml {
        for doc in documents(file) {
            if doc["kind"] == "ConfigMap" {
                let Value::Mapping(data) = &doc["data"] else {
                    panic!("{}: ConfigMap without data", file.display());
                };
                for (key, value) in data {
                    if key.as_str().is_some_and(|k| k.ends_with(".toml")) {
                        check_config(value.as_str().unwrap(), &file.display().to_string());
                        configs += 1;
                    }
                }
            }
        }
    }
    for file in deploy_files(&["toml"]) {
        check_config(
            &std::fs::read_to_string(&file).unwrap(),
            &file.display().to_string(),
        );
        configs += 1;
    }
    assert!(
        configs >= 2,
        "the Kubernetes ConfigMap and the compose file's config"
    );
}

#[test]
fn the_kubernetes_sidecar_is_native_probed_and_locked_down() {
    let file = repo_root().join("deploy/kubernetes/token-sidecar.yaml");
    let docs = documents(&file);
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let command = &sidecar[probe]["exec"]["command"];
        assert_eq!(command[0], "/usr/local/bin/token-sidecar", "{probe}");
        assert_eq!(command[1], "probe", "{probe}");
    }
    let security = &sidecar["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert!(!sidecar["resources"]["requests"]["memory"].is_null());
    let secret_volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| !v["secret"].is_null())
        .expect("secrets mounted as files");
    assert_eq!(secret_volume["secret"]["defaultMode"], 0o440);
    assert_eq!(
        pod["securityContext"]["fsGroup"], 65532,
        "the non-root sidecar can read them"
    );
}

#[test]
fn the_compose_app_shares_the_sidecar_network() {
    let file = repo_root().join("deploy/compose/docker-compose.yml");
    let doc = &documents(&file)[0];
    let services = &doc["services"];
    assert_eq!(services["app"]["network_mode"], "service:token-sidecar");
    assert_eq!(
        services["app"]["depends_on"]["token-sidecar"]["condition"],
        "service_healthy"
    );
    let sidecar = &services["token-sidecar"];
    assert_eq!(sidecar["read_only"], true);
    assert_eq!(sidecar["cap_drop"][0], "ALL");
    let mount = sidecar["volumes"][0].as_str().unwrap();
    assert!(
        mount.starts_with("./sidecar.toml:/etc/token-sidecar/sidecar.toml"),
        "{mount}"
    );
}

#[test]
fn the_dockerfile_runs_the_binary_as_non_root_with_the_documented_config_path() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for line in [
        "RUN cargo build --release --locked",
        "USER 65532:65532",
        "ENV TOKEN_SIDECAR_CONFIG=/etc/token-sidecar/sidecar.toml",
        "EXPOSE 8080 9901",
        "STOPSIGNAL SIGTERM",
        "ENTRYPOINT [\"/usr/local/bin/token-sidecar\"]",
    ] {
        let found = text
            .lines()
            .any(|l| l.trim() == line || l.trim().strip_suffix(" \\").is_some_and(|l| l.starts_with(line)));
        assert!(found, "missing `{line}`");
    }
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    assert!(
        ci.contains("cargo build --release --locked"),
        ".ci/run proves the image's build command"
    );
    assert!(ci.contains("hadolint Dockerfile"));
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !crate::support::tool_works("promtool", &["--version"]) {
        crate::support::skip(
            "the_alert_rules_pass_promtool_check_and_their_unit_tests",
            "needs `promtool` (Debian's prometheus package; .ci/run installs it)",
        );
        return;
    }
    let dir = repo_root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The alert names in `deploy/prometheus/alerts.yml`.
fn alert_names() -> Vec<String> {
    let rules = &documents(&repo_root().join("deploy/prometheus/alerts.yml"))[0];
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_sequence().unwrap().clone())
        .map(|rule| rule["alert"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_alert_has_a_runbook_line_in_the_readmes_troubleshooting_and_a_unit_test() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let troubleshooting = readme
        .split("\n## Troubleshooting")
        .nth(1)
        .expect("a Troubleshooting section")
        .split("\n## ")
        .next()
        .unwrap();
    let tests = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.test.yml")).unwrap();
    let names = alert_names();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            troubleshooting.contains(&format!("`{name}`")),
            "no runbook line for {name} in the README"
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "no promtool test of {name}"
        );
    }
}

#[test]
fn the_kustomize_base_and_its_monitoring_overlay_render_a_podmonitor_that_finds_the_metrics_port() {
    if !crate::support::tool_works("kubectl", &["kustomize", "--help"]) {
        crate::support::skip(
            "the_kustomize_base_and_its_monitoring_overlay_render_a_podmonitor_that_finds_the_metrics_port",
            "needs `kubectl` (Debian's kubernetes-client; .ci/run installs it)",
        );
        return;
    }
    let render = |dir: &str| -> Vec<Value> {
        let output = std::process::Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        serde_norway::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).unwrap())
            .filter(|doc| !doc.is_null())
            .collect()
    };
    let base = render("deploy/kubernetes");
    assert!(base.iter().any(|doc| doc["kind"] == "Deployment"));
    assert!(
        !base.iter().any(|doc| doc["kind"] == "PodMonitor"),
        "the base needs no Prometheus Operator"
    );
    let monitored = render("deploy/prometheus/kubernetes");
    let deployment = monitored
        .iter()
        .find(|doc| doc["kind"] == "Deployment")
        .expect("the deployment");
    let monitor = monitored
        .iter()
        .find(|doc| doc["kind"] == "PodMonitor")
        .expect("a PodMonitor");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let Value::Mapping(selector) = &monitor["spec"]["selector"]["matchLabels"] else {
        panic!("the PodMonitor selects by labels");
    };
    for (key, value) in selector {
        assert_eq!(
            &pod_labels[key.as_str().unwrap()],
            value,
            "the PodMonitor selects the deployment's pods"
        );
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let sidecar = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    let port = sidecar["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|port| port["name"] == endpoint["port"])
        .expect("the sidecar has the port the PodMonitor scrapes");
    let config = monitored
        .iter()
        .find(|doc| doc["kind"] == "ConfigMap")
        .and_then(|doc| doc["data"]["sidecar.toml"].as_str())
        .unwrap();
    let listen = format!(
        "metrics_listen = \"0.0.0.0:{}\"",
        port["containerPort"].as_u64().unwrap()
    );
    assert!(
        config.contains(&listen),
        "the sidecar's metrics listener is on that port: {listen}"
    );
}
