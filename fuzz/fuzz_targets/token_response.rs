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
        ResponseSpec {
            token: "/access_token".into(),
            expires_in: Some("/expires_in".into()),
            expires_at: None,
            issued_at: None,
            token_id: None,
            default_ttl: None,
        },
        ResponseSpec {
            token: "/data/accessToken".into(),
            expires_in: None,
            expires_at: Some(("/data/expiryTime".into(), TimeUnit::Millis)),
            issued_at: Some(("/data/createdTimestamp".into(), TimeUnit::Millis)),
            token_id: Some("/data/id".into()),
            default_ttl: Some(Duration::from_secs(10)),
        },
        ResponseSpec {
            token: "/accessToken".into(),
            expires_in: None,
            expires_at: Some(("/exp".into(), TimeUnit::Seconds)),
            issued_at: None,
            token_id: None,
            default_ttl: Some(Duration::from_secs(900)),
        },
    ];
    for spec in &specs {
        if let Ok(issued) = parse_response(spec, data, requested_at) {
            assert!(issued.expires_at > requested_at);
            assert!(!issued.token.expose().is_empty());
        }
    }
    let _ = error_code_from_body(data);
});
