//! Properties of the pure parts: path-prefix matching and joining, the path rule, and the
//! lifetime policy.

use std::time::{Duration, SystemTime};

use percent_encoding::percent_decode_str;
use proptest::prelude::*;
use token_sidecar::route::{check_path, join_path, strip_prefix};
use token_sidecar::token::lifetime::{Freshness, RefreshPolicy};

fn segment() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,6}"
}

/// Pieces of paths an attacker would combine.
const PATH_PIECES: &[&str] = &[
    "/",
    "a",
    "x1",
    ".",
    "..",
    "%2e",
    "%2E",
    "%252e",
    "%25",
    "2e",
    "%2f",
    "%2F",
    "%252f",
    "%5c",
    "%255c",
    "\\",
    ";",
    ";x=1",
    "%3b",
    "%c0%ae",
    "%c0",
    "%ae",
    "%e2%82%ac",
    "-",
    "~",
];

fn path_of(segments: Vec<String>) -> String {
    segments.iter().map(|s| format!("/{s}")).collect()
}

proptest! {
    #[test]
    fn a_prefix_matches_exactly_the_paths_under_it(
        prefix in prop::collection::vec(segment(), 1..4),
        path in prop::collection::vec(segment(), 0..6),
    ) {
        let prefix = path_of(prefix);
        let path = path_of(path);
        let under = path == prefix || path.starts_with(&format!("{prefix}/"));
        match strip_prefix(&prefix, &path) {
            Some(rest) => {
                prop_assert!(under);
                prop_assert_eq!(format!("{prefix}{rest}"), path.clone());
                prop_assert!(rest.is_empty() || rest.starts_with('/'));
            }
            None => prop_assert!(!under),
        }
    }

    #[test]
    fn a_prefix_never_matches_a_longer_segment(prefix in prop::collection::vec(segment(), 1..4), tail in "[a-z0-9]{1,4}") {
        let prefix = path_of(prefix);
        let path = format!("{prefix}{tail}/x");
        prop_assert_eq!(strip_prefix(&prefix, &path), None);
    }

    #[test]
    fn joining_keeps_the_base_path_and_the_rest(
        base in prop::collection::vec(segment(), 0..3),
        rest in prop::collection::vec(segment(), 0..4),
    ) {
        let base = path_of(base);
        let rest = path_of(rest);
        let joined = join_path(&base, &rest);
        prop_assert!(joined.starts_with('/'));
        prop_assert!(joined.starts_with(&base));
        prop_assert!(joined.ends_with(&rest));
        prop_assert_eq!(joined.len(), (base.len() + rest.len()).max(1));
        prop_assert!(check_path(&joined).is_ok());
    }

    #[test]
    fn dot_segments_are_always_refused(
        before in prop::collection::vec(segment(), 0..3),
        dots in prop::sample::select(vec!["..", ".", "%2e%2e", "%2E.", ".%2e", "%2e", "%252e%252e", "..;", ".;x", "%2e%2e%3b"]),
        after in prop::collection::vec(segment(), 0..3),
    ) {
        let path = format!("{}/{dots}{}", path_of(before), path_of(after));
        prop_assert!(check_path(&path).is_err(), "{}", path);
    }

    /// Whatever a server does with an accepted path — decode it once or twice, treat `\` as a
    /// separator, strip `;parameters` — it finds no dot segment to climb with.
    #[test]
    fn an_accepted_path_has_no_dot_segment_under_any_decoding(
        pieces in prop::collection::vec(prop::sample::select(PATH_PIECES.to_vec()), 1..12),
    ) {
        let path: String = pieces.concat();
        if check_path(&path).is_ok() {
            let once = percent_decode_str(&path).decode_utf8_lossy().into_owned();
            let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
            for decoded in [path.as_str(), &once, &twice] {
                let climbs = decoded
                    .split(['/', '\\'])
                    .map(|segment| segment.split(';').next().unwrap_or(segment))
                    .any(|name| name == "." || name == "..");
                prop_assert!(!climbs, "{} accepted, but decodes to {}", path, decoded);
            }
        }
    }

    #[test]
    fn the_lifetime_schedule_is_ordered_and_bounded(
        lifetime_ms in 0u64..(2 * 366 * 86_400_000),
        jitter in 0.0f64..1.0,
    ) {
        let policy = RefreshPolicy::default();
        let obtained = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let lifetime = Duration::from_millis(lifetime_ms);
        let expires = obtained + lifetime;
        let s = policy.schedule(obtained, expires, jitter);
        prop_assert!(obtained <= s.refresh_at);
        prop_assert!(s.refresh_at <= s.unusable_at);
        prop_assert!(s.unusable_at <= s.expires_at);
        let margin = expires.duration_since(s.unusable_at).unwrap();
        prop_assert!(margin <= policy.max_expiry_margin);
        prop_assert!(margin <= lifetime / 2, "a token is usable for at least half its life");
        if lifetime >= Duration::from_secs(20) {
            prop_assert!(margin >= Duration::from_secs(1), "never sent in its last second");
        }
        let ahead = expires.duration_since(s.refresh_at).unwrap();
        prop_assert!(ahead <= policy.max_refresh_ahead.mul_f64(1.1).max(margin));
        prop_assert!(ahead <= lifetime.mul_f64(0.25 * 1.1).max(margin));
        // Never sent once unusable; always sendable before the refresh point.
        prop_assert_eq!(s.freshness(s.unusable_at), Freshness::Unusable);
        prop_assert_eq!(s.freshness(expires), Freshness::Unusable);
        if s.refresh_at > obtained {
            prop_assert_eq!(s.freshness(obtained), Freshness::Fresh);
        }
    }
}
