//! Arbitrary text as a request path: the path rule never panics, and a path it accepts has no
//! dot segment however a server decodes it (once, twice, `\` as a separator, `;` parameters).
#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;
use token_sidecar::route::check_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if check_path(path).is_err() {
        return;
    }
    let once = percent_decode_str(path).decode_utf8_lossy().into_owned();
    let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
    for decoded in [path, &once, &twice] {
        let climbs = decoded
            .split(['/', '\\'])
            .map(|segment| segment.split(';').next().unwrap_or(segment))
            .any(|name| name == "." || name == "..");
        assert!(!climbs, "{path:?} was accepted but decodes to {decoded:?}");
    }
});
