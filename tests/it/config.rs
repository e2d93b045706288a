//! `token-sidecar check` on the shipped examples and on broken configs: exit 2 with every
//! problem named by file, line and key path.

use std::io::Write;

use base64::Engine;

use crate::support::{repo_root, run_binary};

/// The secrets the examples reference by environment variable.
const EXAMPLE_ENV: &[(&str, &str)] = &[
    ("NUAPAY_API_KEY", "example-nuapay-key"),
    ("ACME_SETU_SECRET", "example-setu-secret"),
    ("ACME_BOOKING_SECRET", "example-booking-secret"),
    ("ACME_PAYU_SECRET", "example-payu-secret"),
    ("GLOBEX_PAYU_SECRET", "example-globex-secret"),
    ("TOKEN_SIDECAR_REDIS_URL", "redis://127.0.0.1:6379"),
    ("TOKEN_SIDECAR_REDIS_PASSWORD", "example-redis-password"),
    (
        "TOKEN_SIDECAR_CACHE_KEY",
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    ),
];

/// The keys and certificates `config/open-banking.toml` references: a test-only RSA key, a
/// client certificate from a throwaway CA and a fresh DPoP key.
fn open_banking_env() -> Vec<(&'static str, String)> {
    let pki = token_sidecar::dev::certs::TestPki::new().unwrap();
    let (cert, key) = pki.client_certificate("acme").unwrap();
    let signing = std::fs::read_to_string(repo_root().join("tests/fixtures/keys/rsa-2048.pem")).unwrap();
    vec![
        ("EGRESS_PROXY_AUTH", "egress:example".to_owned()),
        ("ACME_QWAC_CERT", cert),
        ("ACME_QWAC_KEY", key),
        ("ACME_SIGNING_KEY", signing),
        (
            "ACME_DPOP_KEY",
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        ),
    ]
}

#[test]
fn every_example_config_passes_check() {
    let dir = repo_root().join("config");
    let open_banking = open_banking_env();
    let mut env: Vec<(&str, &str)> = EXAMPLE_ENV.to_vec();
    env.extend(open_banking.iter().map(|(k, v)| (*k, v.as_str())));
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stdout, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()], &env);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.starts_with("config OK: "), "{stdout}");
            assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "one example per provider plus the combined one, found {checked}"
    );
}

#[test]
fn config_may_come_from_the_environment() {
    let path = repo_root().join("config/payu.toml");
    let mut env = EXAMPLE_ENV.to_vec();
    env.push(("TOKEN_SIDECAR_CONFIG", path.to_str().unwrap()));
    let (code, stdout, stderr) = run_binary(&["check"], &env);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("config OK"));
}

fn check(text: &str) -> (i32, String, String) {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_binary(&["check", "--config", &path], &[]);
    (code, stdout, stderr.replace(&path, "FILE"))
}

const VALID: &str = r#"[server]
listen = "127.0.0.1:8080"

[providers.payu]
token_url = "https://uat-accounts.payu.in/oauth/token"

[credentials.acme-payu]
provider = "payu"
client_id = "acme"
client_secret = "literal-secret"

[[routes]]
path_prefix = "/acme/payu"
upstream = "https://uat-accounts.payu.in"
credential = "acme-payu"
"#;

#[test]
fn a_valid_config_prints_a_summary() {
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "config OK: 1 provider(s), 1 credential(s), 1 route(s); listening on 127.0.0.1:8080"
    );
}

#[test]
fn unknown_key_names_file_line_and_key_path() {
    let text = VALID.replace(
        "credential = \"acme-payu\"",
        "credential = \"acme-payu\"\ncredentail = \"typo\"",
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(stderr.contains("FILE:16"), "{stderr}");
    assert!(stderr.contains("routes[0].credentail"), "{stderr}");
    assert!(stderr.contains("unknown field `credentail`"), "{stderr}");
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_at_once() {
    let text = VALID
        .replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nlisten_port = 1",
        )
        .replace("client_id = \"acme\"", "client_id = 42")
        .replace(
            "credential = \"acme-payu\"",
            "credential = \"acme-payu\"\ncredentail = \"typo\"",
        );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    for expected in [
        "FILE:3: server.listen_port: unknown field `listen_port`",
        "FILE:10: credentials.acme-payu.client_id: invalid type: integer `42`, expected a string",
        "FILE:17: routes[0].credentail: unknown field `credentail`",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
}

#[test]
fn wrong_type_names_file_line_and_key_path() {
    let text = VALID.replace("client_id = \"acme\"", "client_id = 42");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(stderr.contains("FILE:9"), "{stderr}");
    assert!(stderr.contains("credentials.acme-payu.client_id"), "{stderr}");
}

#[test]
fn every_reference_problem_is_reported_at_once() {
    let text = format!(
        "{VALID}
[[routes]]
path_prefix = \"/globex\"
upstream = \"http://plain.example\"
credential = \"globex-payu\"

[credentials.orphan]
provider = \"nobody\"
client_id = \"x\"
client_secret = {{ env = \"TOKEN_SIDECAR_TEST_UNSET_VAR\" }}
"
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2, "{stderr}");
    let expected = [
        "FILE:19: routes[1].upstream: http:// would send tokens",
        "FILE:20: routes[1].credential: no credential named `globex-payu`",
        "FILE:23: credentials.orphan.provider: no provider named `nobody`",
    ];
    for line in expected {
        assert!(stderr.contains(line), "missing `{line}` in\n{stderr}");
    }
}

#[test]
fn missing_env_secret_is_named() {
    let text = VALID.replace("\"literal-secret\"", "{ env = \"TOKEN_SIDECAR_TEST_UNSET_VAR\" }");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("FILE:10: credentials.acme-payu.client_secret: environment variable TOKEN_SIDECAR_TEST_UNSET_VAR is not set"),
        "{stderr}"
    );
}

#[test]
fn unreadable_and_empty_secret_files_are_named() {
    let empty = tempfile::NamedTempFile::new().unwrap();
    let text = VALID.replace(
        "\"literal-secret\"",
        &format!("{{ file = \"{}\" }}", empty.path().display()),
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(stderr.contains("client_secret: the secret is empty"), "{stderr}");

    let text = VALID.replace("\"literal-secret\"", "{ file = \"/nonexistent/secret\" }");
    let (_, _, stderr) = check(&text);
    assert!(
        stderr.contains("cannot read secret file /nonexistent/secret"),
        "{stderr}"
    );
}

#[test]
fn plaintext_is_allowed_only_when_asked_for() {
    let text = VALID
        .replace(
            "https://uat-accounts.payu.in/oauth/token",
            "http://127.0.0.1:9/oauth/token",
        )
        .replace(
            "[credentials.acme-payu]",
            "allow_plaintext = true\n\n[credentials.acme-payu]",
        );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 0, "{stderr}");
    let text = VALID.replace(
        "https://uat-accounts.payu.in/oauth/token",
        "http://127.0.0.1:9/oauth/token",
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("FILE:5: providers.payu.token_url: http://"),
        "{stderr}"
    );
}

#[test]
fn duplicate_routes_and_bad_values_are_refused() {
    let text = format!(
        "{VALID}
[[routes]]
path_prefix = \"/acme/payu/\"
upstream = \"https://other.example\"
credential = \"acme-payu\"
inject = {{ header = \"X-Token\", format = \"no placeholder\" }}
timeout = \"0s\"
"
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    for expected in [
        "routes[1].inject.format: must contain {token}",
        "routes[1].timeout: must not be zero",
    ] {
        assert!(stderr.contains(expected), "missing {expected} in\n{stderr}");
    }
    let text = format!(
        "{VALID}
[[routes]]
path_prefix = \"/acme/payu/\"
upstream = \"https://other.example\"
credential = \"acme-payu\"
"
    );
    let (_, _, stderr) = check(&text);
    assert!(
        stderr.contains("FILE:17: routes[1]: matches the same requests as routes[0]"),
        "{stderr}"
    );
}

#[test]
fn non_loopback_listen_needs_explicit_consent() {
    let text = VALID.replace("127.0.0.1:8080", "0.0.0.0:8080");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("FILE:2: server.listen: 0.0.0.0:8080 is not a loopback address"),
        "{stderr}"
    );
    let text = text.replace("[server]", "[server]\nallow_non_loopback = true");
    assert_eq!(check(&text).0, 0);
}

#[test]
fn run_refuses_what_check_refuses() {
    let text = VALID.replace("credential = \"acme-payu\"", "credential = \"nobody\"");
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let (code, _, stderr) = run_binary(&["run", "--config", file.path().to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("routes[0].credential: no credential named `nobody`"),
        "{stderr}"
    );
    let (code, _, _) = run_binary(&["--config", file.path().to_str().unwrap()], &[]);
    assert_eq!(code, 2, "--config alone means run");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (code, _, stderr) = run_binary(&["check", "--config", "/nonexistent/sidecar.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/sidecar.toml: cannot read the config file"),
        "{stderr}"
    );
}

#[test]
fn bad_urls_are_named() {
    let text = VALID
        .replace("https://uat-accounts.payu.in/oauth/token", "not a url")
        .replace(
            "upstream = \"https://uat-accounts.payu.in\"",
            "upstream = \"ftp://files.example\"",
        );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("FILE:5: providers.payu.token_url: `not a url` is not an absolute http(s) URL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("FILE:14: routes[0].upstream: scheme `ftp` is not http or https"),
        "{stderr}"
    );
}

#[test]
fn one_run_reports_shape_reference_and_secret_problems_with_suggestions() {
    let text = VALID
        .replace("listen = ", "listne = ")
        .replace("credential = \"acme-payu\"", "credential = \"acme-payuu\"")
        .replace("\"literal-secret\"", "{ env = \"TOKEN_SIDECAR_TEST_UNSET_VAR\" }");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2, "{stderr}");
    let expected = [
        "FILE:2: server.listne: unknown field `listne`",
        "did you mean `listen`?",
        "FILE:10: credentials.acme-payu.client_secret: environment variable TOKEN_SIDECAR_TEST_UNSET_VAR is not set",
        "FILE:15: routes[0].credential: no credential named `acme-payuu` in [credentials]; did you mean `acme-payu`? (defined: acme-payu)",
    ];
    for line in expected {
        assert!(stderr.contains(line), "missing `{line}` in\n{stderr}");
    }
}

#[test]
fn a_missing_provider_lists_the_defined_ones() {
    let text = VALID.replace("provider = \"payu\"", "provider = \"pauy\"");
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no provider named `pauy` in [providers]; did you mean `payu`? (defined: payu)"),
        "{stderr}"
    );
}

/// `client_id` and `organisation` may come from the environment or a file, as secrets do, and
/// every relative path is relative to the config file's directory, not the working directory.
#[test]
fn ids_take_secret_references_and_relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = token_sidecar::dev::certs::TestPki::new().unwrap();
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/org"), "ybo8zd8j2q\n").unwrap();
    std::fs::write(dir.path().join("secrets/api-key"), "key\n").unwrap();
    let text = r#"
[tls]
ca_file = "ca.pem"

[providers.nuapay]
kind = "nuapay"
base_url = "https://sandbox.nuapay.com"
api_key = { file = "secrets/api-key" }

[providers.payu]
token_url = "https://uat-accounts.payu.in/oauth/token"

[credentials.acme-nuapay]
provider = "nuapay"
organisation = { file = "secrets/org" }
scopes = ["openbanking_pisp"]

[credentials.acme-payu]
provider = "payu"
client_id = { env = "TOKEN_SIDECAR_TEST_CLIENT_ID" }
client_secret = "s"

[[routes]]
path_prefix = "/n"
upstream = "https://sandbox.nuapay.com"
credential = "acme-nuapay"

[[routes]]
path_prefix = "/p"
upstream = "https://uat-accounts.payu.in"
credential = "acme-payu"
"#;
    let config = dir.path().join("sidecar.toml");
    std::fs::write(&config, text).unwrap();
    let args = ["check", "--config", config.to_str().unwrap()];
    let (code, stdout, stderr) = run_binary(&args, &[("TOKEN_SIDECAR_TEST_CLIENT_ID", "acme")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("config OK"), "{stdout}");
    let (code, _, stderr) = run_binary(&args, &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(
            "credentials.acme-payu.client_id: environment variable TOKEN_SIDECAR_TEST_CLIENT_ID is not set"
        ),
        "{stderr}"
    );
}

#[test]
fn a_port_clash_is_reported_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = VALID.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    file.write_all(text.as_bytes()).unwrap();
    let (code, _, stderr) = run_binary(&["run", "--config", file.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.matches("in use").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn dev_runs_its_own_config_and_refuses_one_given() {
    let (code, _, stderr) = run_binary(&["dev", "--config", "mine.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unexpected argument '--config'"), "{stderr}");
}

#[test]
fn durations_beyond_a_sane_bound_are_refused_with_their_key_path() {
    let text = VALID
        .replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nidle_timeout = \"9000000000000000000s\"",
        )
        .replace(
            "client_secret = \"literal-secret\"",
            "client_secret = \"literal-secret\"\n\n[cache]\nmax_failure_backoff = \"400d\"\nretry_budget = \"2h\"",
        )
        .replace(
            "credential = \"acme-payu\"",
            "credential = \"acme-payu\"\ntimeout = \"100y\"",
        );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "server.idle_timeout: must be at most 1day",
        "cache.max_failure_backoff: must be at most 1day",
        "cache.retry_budget: must be at most 10m",
        "routes[0].timeout: must be at most 1h",
    ] {
        assert!(stderr.contains(expected), "{expected} in: {stderr}");
    }
}

#[test]
fn check_warns_of_a_revoke_a_fleet_cannot_always_honour() {
    let text = format!(
        r#"[providers.nuapay]
kind = "nuapay"
base_url = "https://sandbox.nuapay.com"
api_key = "key"
revoke_on_shutdown = true

[credentials.acme]
provider = "nuapay"
organisation = "ybo8zd8j2q"
scopes = ["openbanking_pisp"]

[cache.shared]
redis_url = "redis://127.0.0.1:6379"
encryption_key = "{}"
"#,
        base64::engine::general_purpose::STANDARD.encode([1u8; 32])
    );
    let (code, stdout, stderr) = check(&text);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("config OK"));
    assert!(
        stderr.contains("warning: FILE:5: providers.nuapay.revoke_on_shutdown: with [cache.shared] a token is revoked only by the last sidecar"),
        "{stderr}"
    );
}

#[test]
fn production_redis_and_fetch_budget_keys_are_checked_with_their_key_paths() {
    let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
    let text = VALID.replace(
        "[[routes]]",
        &format!(
            r#"[cache.shared]
redis_url = "rediss://127.0.0.1:6380"
sentinels = ["10.0.0.1:26379"]
cluster_nodes = ["10.0.1.1:6379"]
encryption_key = "{key}"

[[routes]]"#
        ),
    )
    .replace(
        "token_url = \"https://uat-accounts.payu.in/oauth/token\"",
        "token_url = \"https://uat-accounts.payu.in/oauth/token\"\nmax_fetch_rate = \"fast\"\nmax_fetch_burst = 0",
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2, "{stderr}");
    for expected in [
        "cache.shared.cluster_nodes: sentinels and cluster_nodes exclude each other",
        "providers.payu.max_fetch_rate: `fast` is not a rate such as \"50/s\"",
    ] {
        assert!(stderr.contains(expected), "{expected} in: {stderr}");
    }

    let text = VALID.replace(
        "[[routes]]",
        &format!(
            "[identities.redis]\ncert = \"x\"\nkey = \"y\"\n\n[cache.shared]\nredis_url = \"redis://127.0.0.1:6379\"\nclient_identity = \"redis\"\nsentinel_master = \"tokens\"\nencryption_key = \"{key}\"\n\n[[routes]]"
        ),
    );
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cache.shared.sentinel_master: is used only with sentinels"),
        "{stderr}"
    );

    let sentinel = VALID.replace(
        "[[routes]]",
        &format!(
            "[cache.shared]\nredis_url = \"rediss://127.0.0.1:6380\"\nsentinels = [\"10.0.0.1:26379\"]\nsentinel_master = \"tokens\"\nencryption_key = \"{key}\"\n\n[[routes]]"
        ),
    );
    let (code, _, stderr) = check(&sentinel);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("with sentinels, redis_url gives only the scheme and credentials"),
        "{stderr}"
    );
}
