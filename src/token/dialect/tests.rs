use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::*;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn oauth2_spec() -> ResponseSpec {
    ResponseSpec::oauth2()
}

fn nuapay_spec() -> ResponseSpec {
    ResponseSpec::nuapay(Duration::from_secs(10))
}

fn jwt(exp: u64, iat: u64) -> String {
    format!(
        "eyJhbGciOiJIUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp},"iat":{iat}}}"#))
    )
}

#[test]
fn payu_expires_in_counts_from_when_we_asked() {
    let body = br#"{"access_token":"82c38b64e0","token_type":"Bearer","expires_in":7200,"scope":"s","created_at":1595411399}"#;
    let issued = parse_response(&oauth2_spec(), body, at(1_000)).unwrap();
    assert_eq!(issued.token.expose(), "82c38b64e0");
    assert_eq!(issued.expires_at, at(8_200));
    assert_eq!(issued.lifetime, Duration::from_secs(7200));
}

#[test]
fn nuapay_lifetime_comes_from_expiry_minus_creation_not_from_its_clock() {
    // The provider's clock is 1000 s behind ours; its 10 s token is still 10 s long for us.
    let body = br#"{"data":{"id":"3fe40be4","accessToken":"tok","tokenType":"BEARER","expiryTime":1010000,"createdTimestamp":1000000}}"#;
    let issued = parse_response(&nuapay_spec(), body, at(2_000)).unwrap();
    assert_eq!(issued.expires_at, at(2_010));
    assert_eq!(issued.token_id.as_deref(), Some("3fe40be4"));
}

#[test]
fn setu_lifetime_comes_from_the_jwt_when_the_answer_has_none() {
    let spec = ResponseSpec {
        token: "/accessToken".into(),
        expires_in: None,
        default_ttl: Some(Duration::from_secs(900)),
        ..oauth2_spec()
    };
    let token = jwt(1_637_242_869, 1_637_242_569);
    let body = format!(r#"{{"accessToken":"{token}","refreshToken":"r"}}"#);
    let issued = parse_response(&spec, body.as_bytes(), at(5_000)).unwrap();
    assert_eq!(
        issued.lifetime,
        Duration::from_secs(300),
        "JWT says 300 s; default_ttl is only a fallback"
    );
}

#[test]
fn the_earlier_of_expires_in_and_jwt_exp_wins() {
    let token = jwt(1_000 + 60, 1_000);
    let body = format!(r#"{{"access_token":"{token}","expires_in":3600}}"#);
    let issued = parse_response(&oauth2_spec(), body.as_bytes(), at(1_000)).unwrap();
    assert_eq!(issued.lifetime, Duration::from_secs(60));
}

#[test]
fn default_ttl_applies_only_when_nothing_states_an_expiry() {
    let spec = ResponseSpec {
        default_ttl: Some(Duration::from_secs(900)),
        ..oauth2_spec()
    };
    let issued = parse_response(&spec, br#"{"access_token":"opaque"}"#, at(0)).unwrap();
    assert_eq!(issued.lifetime, Duration::from_secs(900));
    let err = parse_response(&oauth2_spec(), br#"{"access_token":"opaque"}"#, at(0)).unwrap_err();
    assert_eq!(
        err,
        FetchError::malformed("answer states no expiry and no default_ttl is configured")
    );
}

#[test]
fn numeric_strings_are_accepted_for_expiry() {
    let issued = parse_response(
        &oauth2_spec(),
        br#"{"access_token":"t","expires_in":"3600"}"#,
        at(0),
    )
    .unwrap();
    assert_eq!(issued.lifetime, Duration::from_secs(3600));
}

const TOKEN_CHARS: &str = "token has characters outside the allowed set (token_chars)";

#[test]
fn tokens_outside_token68_are_refused_unless_the_provider_allows_visible_ascii() {
    assert!(TokenChars::Token68.admits("eyJhbGciOi.payload_-~+/sig=="));
    assert!(!TokenChars::Token68.admits("tok:en"));
    assert!(!TokenChars::Token68.admits("tök"));
    assert!(TokenChars::VisibleAscii.admits("tok:en|{x}"));
    assert!(!TokenChars::VisibleAscii.admits("tök"));
    assert!(!TokenChars::VisibleAscii.admits("a b"));
    let spec = ResponseSpec {
        token_chars: TokenChars::VisibleAscii,
        ..oauth2_spec()
    };
    let issued = parse_response(&spec, br#"{"access_token":"a:b","expires_in":10}"#, at(0)).unwrap();
    assert_eq!(issued.token.expose(), "a:b");
}

#[test]
fn unusable_answers_are_typed_errors() {
    let cases: &[(&[u8], &str)] = &[
        (b"<html>oops</html>", "answer is not JSON"),
        (b"\xff\xfe\x00", "answer is not JSON"),
        (br#"{"token":"x","expires_in":10}"#, "answer has no token field"),
        (br#"{"access_token":42,"expires_in":10}"#, "token field is not a string"),
        (br#"{"access_token":"","expires_in":10}"#, "token field is empty"),
        (br#"{"access_token":"a b","expires_in":10}"#, TOKEN_CHARS),
        ("{\"access_token\":\"t\u{e9}\",\"expires_in\":10}".as_bytes(), TOKEN_CHARS),
        (br#"{"access_token":"a\"b","expires_in":10}"#, TOKEN_CHARS),
        (br#"{"access_token":"=abc","expires_in":10}"#, TOKEN_CHARS),
        (br#"{"access_token":"t","expires_in":1e-9}"#, "token lives less than a second"),
        (br#"{"access_token":"t","expires_in":0.5}"#, "token lives less than a second"),
        (br#"{"access_token":"t","expires_in":{"x":1}}"#, "expires_in field is not a number"),
        (br#"{"access_token":"t","expires_in":0}"#, "token had expired when it arrived"),
        (br#"{"access_token":"t","expires_in":-5}"#, "token had expired when it arrived"),
        (br#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"#, "answer is not JSON"),
    ];
    for (body, reason) in cases {
        let err = parse_response(&oauth2_spec(), body, at(100)).unwrap_err();
        assert_eq!(
            err,
            FetchError::malformed(reason),
            "body {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn absolute_expiry_in_the_past_is_rejected() {
    let spec = ResponseSpec {
        expires_in: None,
        expires_at: Some(("/exp".into(), TimeUnit::Seconds)),
        ..oauth2_spec()
    };
    let err = parse_response(&spec, br#"{"access_token":"t","exp":50}"#, at(100)).unwrap_err();
    assert_eq!(err, FetchError::malformed("token had expired when it arrived"));
}

#[test]
fn form_body_joins_lists_with_spaces_and_json_keeps_them() {
    let mut request = TokenRequest {
        url: Arc::new("https://example.test/oauth/token".parse().unwrap()),
        encoding: BodyEncoding::Form,
        fields: vec![
            ("grant_type".into(), BodyValue::Text("client_credentials".into())),
            ("client_secret".into(), BodyValue::Secret(Secret::new("s&cret"))),
            (
                "scope".into(),
                BodyValue::List(["create_payment_links".into(), "read_payment_links".into()].into()),
            ),
        ],
        authorization: None,
        secrets: vec![],
        assertion: None,
        dpop: None,
    };
    let (content_type, body) = request.encode_body(SystemTime::now()).unwrap();
    assert_eq!(content_type, "application/x-www-form-urlencoded");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "grant_type=client_credentials&client_secret=s%26cret&scope=create_payment_links+read_payment_links"
    );
    request.encoding = BodyEncoding::Json;
    request.fields = vec![
        (
            "scopes".into(),
            BodyValue::List(["openbanking_pisp".into()].into()),
        ),
        ("expiresIn".into(), BodyValue::Number(360)),
    ];
    let (content_type, body) = request.encode_body(SystemTime::now()).unwrap();
    assert_eq!(content_type, "application/json");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"scopes":["openbanking_pisp"],"expiresIn":360}"#
    );
}

#[test]
fn a_credential_identity_changes_with_its_secret_and_scopes_and_never_contains_them() {
    let request = |secret: &str, scope: &str| TokenRequest {
        url: Arc::new("https://auth.example/oauth/token".parse().unwrap()),
        encoding: BodyEncoding::Form,
        fields: vec![
            ("client_id".into(), BodyValue::Text("acme".into())),
            ("client_secret".into(), BodyValue::Secret(Secret::new(secret))),
            ("scope".into(), BodyValue::Text(scope.to_owned().into())),
        ],
        authorization: None,
        secrets: vec![Secret::new(secret)],
        assertion: None,
        dpop: None,
    };
    let spec = ResponseSpec::oauth2();
    let base = credential_identity(&request("s3cret-one", "read"), &spec);
    assert_eq!(
        base,
        credential_identity(&request("s3cret-one", "read"), &spec),
        "stable"
    );
    assert_ne!(
        base,
        credential_identity(&request("s3cret-two", "read"), &spec),
        "rotated secret"
    );
    assert_ne!(
        base,
        credential_identity(&request("s3cret-one", "write"), &spec),
        "other scopes"
    );
    let other_answer = ResponseSpec {
        token: "/data/token".into(),
        ..ResponseSpec::oauth2()
    };
    assert_ne!(
        base,
        credential_identity(&request("s3cret-one", "read"), &other_answer)
    );
    let shown = format!("{base:?}");
    assert_eq!(
        shown.len(),
        "Identity()".len() + 32,
        "128 bits of a SHA-256, in hex"
    );
    assert!(!shown.contains("s3cret"));

    // The fleet's key for a credential leaves its secrets out: every sidecar computes it alike,
    // and a rotation does not orphan the fleet's token.
    let fleet = |secret: &str, scope: &str| request(secret, scope).digest(Secrets::Left).finalize();
    assert_eq!(fleet("s3cret-one", "read"), fleet("s3cret-two", "read"));
    assert_ne!(fleet("s3cret-one", "read"), fleet("s3cret-one", "write"));
}

#[test]
fn a_token_over_16_kib_is_refused_as_too_long_not_as_badly_spelled() {
    let long = "a".repeat(MAX_TOKEN_BYTES + 1);
    let body = format!(r#"{{"access_token":"{long}","expires_in":10}}"#);
    let err = parse_response(&oauth2_spec(), body.as_bytes(), at(0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token endpoint answer unusable: token is longer than 16 KiB"
    );
    let longest = "a".repeat(MAX_TOKEN_BYTES);
    let body = format!(r#"{{"access_token":"{longest}","expires_in":10}}"#);
    assert!(parse_response(&oauth2_spec(), body.as_bytes(), at(0)).is_ok());
}
