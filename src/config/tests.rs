use std::path::Path;

use super::*;
use crate::token::dialect::{BodyEncoding, BodyValue};

fn load(text: &str) -> Result<Config, Vec<Problem>> {
    Config::from_toml(text, Path::new("t.toml")).map_err(|err| match err {
        ConfigError::Invalid { problems, .. } => problems,
        other => panic!("{other}"),
    })
}

fn problems(text: &str) -> Vec<String> {
    load(text)
        .expect_err("config should be refused")
        .into_iter()
        .map(|p| format!("{}:{}: {}", p.line.unwrap_or(0), p.key_path, p.message))
        .collect()
}

const PAYU: &str = r#"
[providers.payu]
token_url = "https://t.example/oauth/token"
client_id = "shared-id"
client_secret = "shared-secret"
scopes = ["a"]

[credentials.acme]
provider = "payu"
client_secret = "acme-secret"

[[routes]]
path_prefix = "/acme/"
upstream = "https://api.example/v1/"
credential = "acme"
"#;

#[test]
fn defaults_and_normalisation() {
    let config = load(PAYU).unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.server.admin_listen, None);
    let route = &config.routes[0];
    assert_eq!(route.path_prefix.as_deref(), Some("/acme"));
    assert_eq!(route.upstream.base_path, "/v1");
    assert_eq!(route.options.inject, Inject::Bearer);
    assert!(route
        .options
        .purge_on_status
        .contains(http::StatusCode::UNAUTHORIZED));
    assert!(!route
        .options
        .purge_on_status
        .contains(http::StatusCode::FORBIDDEN));
    assert_eq!(route.options.replay_body_limit, 1024 * 1024);
}

#[test]
fn a_credentials_own_secret_wins_over_the_providers() {
    let config = load(PAYU).unwrap();
    let request = &config.credentials[0].request;
    assert_eq!(request.encoding, BodyEncoding::Form);
    assert_eq!(
        request.fields,
        vec![
            ("grant_type".into(), BodyValue::Text("client_credentials".into())),
            ("client_id".into(), BodyValue::Text("shared-id".into())),
            (
                "client_secret".into(),
                BodyValue::Secret(crate::secret::Secret::new("acme-secret"))
            ),
            ("scope".into(), BodyValue::Text("a".into())),
        ]
    );
}

#[test]
fn basic_client_auth_form_encodes_before_base64() {
    let text = PAYU
        .replace(
            "client_id = \"shared-id\"",
            "client_id = \"id:x\"\nclient_auth = \"basic\"",
        )
        .replace("\"acme-secret\"", "\"s&cret\"");
    let config = load(&text).unwrap();
    let request = &config.credentials[0].request;
    assert!(request.fields.iter().all(|(name, _)| &**name != "client_secret"));
    // base64("id%3Ax:s%26cret")
    assert_eq!(
        request.authorization.as_ref().unwrap().expose(),
        "Basic aWQlM0F4OnMlMjZjcmV0"
    );
}

#[test]
fn nuapay_credentials_build_the_organisation_token_request() {
    let text = r#"
[providers.nuapay]
kind = "nuapay"
base_url = "https://sandbox.nuapay.com/"
api_key = "key"
expires_in = "6m"

[credentials.acme]
provider = "nuapay"
organisation = "ybo8zd8j2q"
scopes = ["openbanking_pisp", "admin"]
"#;
    let config = load(text).unwrap();
    let credential = &config.credentials[0];
    assert_eq!(
        credential.request.url.as_str(),
        "https://sandbox.nuapay.com/organisations/ybo8zd8j2q/tokens"
    );
    assert_eq!(
        credential.request.authorization.as_ref().unwrap().expose(),
        "Basic a2V5Og=="
    );
    let (_, body) = credential
        .request
        .encode_body(std::time::SystemTime::now())
        .unwrap();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"scopes":["openbanking_pisp","admin"],"expiresIn":360}"#
    );
    assert_eq!(credential.provider.response.token, "/data/accessToken");
}

#[test]
fn keys_of_the_other_kind_are_refused() {
    let text = r#"
[providers.nuapay]
kind = "nuapay"
base_url = "https://sandbox.nuapay.com"
api_key = "key"
token_url = "https://x.example/token"
"#;
    assert_eq!(
        problems(text),
        ["6:providers.nuapay.token_url: not a key of a nuapay provider"]
    );
}

#[test]
fn json_pointers_are_checked() {
    let text = PAYU.replace(
        "scopes = [\"a\"]",
        "scopes = [\"a\"]\ntoken_field = \"data.accessToken\"",
    );
    assert_eq!(
        problems(&text),
        ["7:providers.payu.token_field: `data.accessToken` is not a JSON pointer; write it as \"/data/accessToken\""]
    );
}

#[test]
fn missing_client_credentials_are_reported_on_the_credential() {
    let text = PAYU.replace("client_id = \"shared-id\"\n", "");
    assert_eq!(
        problems(&text),
        ["7:credentials.acme: needs client_id and client_secret, here or on provider `payu`"]
    );
}

#[test]
fn route_shape_problems() {
    let text = format!(
        "{PAYU}
[[routes]]
host = \"https://bad/host\"
upstream = \"https://api.example?x=1\"
credential_header = \"X-Merchant\"
purge_on_status = [500]
"
    );
    let found = problems(&text);
    for expected in [
        "routes[1].host: `https://bad/host` must be a bare host name",
        "routes[1].upstream: must not carry a query",
        "routes[1].credentials: missing: the allow-list for credential_header",
        "routes[1].purge_on_status[0]: 500 is not a 4xx status",
    ] {
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "missing {expected} in {found:#?}"
        );
    }
}

#[test]
fn reserved_headers_cannot_be_injected_or_set() {
    let text = PAYU.replace(
        "credential = \"acme\"",
        "credential = \"acme\"\ninject = { header = \"Host\" }\nheaders = { \"authorization\" = \"x\" }",
    );
    let found = problems(&text);
    assert!(
        found
            .iter()
            .any(|p| p.contains("routes[0].inject.header: `host` is managed by the sidecar")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("routes[0].headers.authorization")),
        "{found:?}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let found = problems("[server]\nlisten = \n");
    assert!(found[0].starts_with("2:"), "{found:?}");
}

#[test]
fn purge_statuses_are_a_set_of_client_errors_only() {
    let mut set = ClientErrorSet::default();
    assert!(set.insert(http::StatusCode::UNAUTHORIZED));
    assert!(set.insert(http::StatusCode::from_u16(499).unwrap()));
    assert!(!set.insert(http::StatusCode::INTERNAL_SERVER_ERROR));
    assert!(!set.insert(http::StatusCode::PERMANENT_REDIRECT));
    assert!(set.contains(http::StatusCode::UNAUTHORIZED));
    assert!(!set.contains(http::StatusCode::FORBIDDEN));
    assert!(!set.contains(http::StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(format!("{set:?}"), "{401, 499}");
}

#[test]
fn routes_share_one_upstream_and_one_set_of_options_per_distinct_value() {
    let text = format!(
        "{PAYU}
[[routes]]
path_prefix = \"/beta\"
upstream = \"https://api.example/v1\"
credential = \"acme\"

[[routes]]
path_prefix = \"/gamma\"
upstream = \"https://other.example/v1\"
credential = \"acme\"
timeout = \"5s\"
"
    );
    let config = load(&text).unwrap();
    let [acme, beta, gamma] = &config.routes[..] else {
        panic!("three routes")
    };
    assert!(Arc::ptr_eq(&acme.upstream, &beta.upstream));
    assert!(Arc::ptr_eq(&acme.options, &beta.options));
    assert!(!Arc::ptr_eq(&acme.upstream, &gamma.upstream));
    assert!(!Arc::ptr_eq(&acme.options, &gamma.options));
    assert_eq!(gamma.options.timeout, Duration::from_secs(5));
    assert_eq!(beta.label(), "routes[1]");
}

#[test]
fn credentials_share_the_field_names_and_values_their_dialect_fixes() {
    let text = format!("{PAYU}\n[credentials.beta]\nprovider = \"payu\"\n");
    let config = load(&text).unwrap();
    let [acme, beta] = &config.credentials[..] else {
        panic!("two credentials")
    };
    let (acme_name, acme_value) = &acme.request.fields[0];
    let (beta_name, beta_value) = &beta.request.fields[0];
    assert_eq!(&**acme_name, "grant_type");
    assert!(Arc::ptr_eq(acme_name, beta_name));
    let (BodyValue::Text(acme_value), BodyValue::Text(beta_value)) = (acme_value, beta_value) else {
        panic!("grant types are text")
    };
    assert!(Arc::ptr_eq(acme_value, beta_value));
}

#[test]
fn a_deeply_nested_value_is_a_problem_not_a_crash() {
    let depth = 5000;
    let text = format!("{PAYU}\nx = {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let found = problems(&text);
    assert!(found.iter().any(|p| p.contains("recursion limit")), "{found:?}");
}

#[test]
fn the_telemetry_table_is_read_with_its_secrets_kept_secret() {
    let config = load(&format!(
        "{PAYU}\n[telemetry]\nendpoint = \"https://otel.example:4318/\"\nprotocol = \"grpc\"\n\
         headers = {{ \"X-Api-Key\" = \"collector-key-1\" }}\nservice_name = \"checkout\"\n\
         sampler = \"parentbased_traceidratio\"\nsampler_arg = 0.25\n\
         resource_attributes = {{ \"deployment.environment\" = \"prod\" }}\n"
    ))
    .unwrap();
    let telemetry = &config.telemetry;
    assert_eq!(telemetry.endpoint.as_deref(), Some("https://otel.example:4318"));
    assert_eq!(telemetry.protocol, Some(crate::telemetry::OtlpProtocol::Grpc));
    assert_eq!(telemetry.headers[0].0, "x-api-key");
    assert_eq!(telemetry.headers[0].1.expose(), "collector-key-1");
    assert_eq!(
        telemetry.sampler,
        Some(crate::telemetry::SamplerSetting::ParentBasedTraceIdRatio(0.25))
    );
    assert!(!format!("{config:?}").contains("collector-key-1"));
}

#[test]
fn telemetry_problems_are_all_reported_at_once() {
    let found = problems(&format!(
        "{PAYU}\n[telemetry]\nendpoint = \"otel:4318\"\nprotocol = \"http/json\"\n\
         sampler = \"sometimes\"\nsampler_arg = 2.0\n"
    ));
    let text = found.join("\n");
    for key in [
        "telemetry.endpoint",
        "telemetry.protocol",
        "telemetry.sampler_arg",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
    let found = problems(&format!("{PAYU}\n[telemetry]\nsampler = \"sometimes\"\n"));
    assert!(
        found[0].contains("telemetry.sampler: `sometimes` is not a sampler"),
        "{found:?}"
    );
}
