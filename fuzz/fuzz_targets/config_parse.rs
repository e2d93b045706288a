//! Arbitrary text as a config file: validation must return a config or problems, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use token_sidecar::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(err) = Config::from_toml(text, Path::new("fuzz.toml")) {
            let _ = err.to_string();
        }
    }
});
