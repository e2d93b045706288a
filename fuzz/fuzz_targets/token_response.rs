//! Arbitrary bytes as a token endpoint's answer, read by each provider dialect: a token or a
//! typed error, never a panic.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use token_sidecar::token::dialect::{parse_response, ResponseSpec, TimeUnit};
use token_sidecar::token::error::error_code_from_body;

fuzz_target!(|data: &[u8]| {
    let requested_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let specs = [
        ResponseSpec::oauth2(),
        ResponseSpec::nuapay(Duration::from_secs(10)),
        ResponseSpec {
            token: "/accessToken".into(),
            expires_in: None,
            expires_at: Some(("/exp".into(), TimeUnit::Seconds)),
            default_ttl: Some(Duration::from_secs(900)),
            ..ResponseSpec::oauth2()
        },
    ];
    for spec in &specs {
        if let Ok(issued) = parse_response(spec, data, requested_at) {
            assert!(issued.expires_at > requested_at);
            assert!(!issued.token.expose().is_empty());
        }
    }
    let _ = error_code_from_body(data, &["s3cret"]);
});
