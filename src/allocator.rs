//! The allocator's settings: mimalloc (the binary's global allocator, built without transparent
//! huge pages), told to give freed pages back to the OS at once, in small pages.
//!
//! A sidecar's memory is paid once per pod, and its heap peaks at start-up and on reload (the
//! config being parsed, ten thousand tokens being fetched) and then falls: these settings make
//! its resident size follow the fall. Measured in BENCHMARKS.md ("What moved the figures").
//! An operator's own `MIMALLOC_PURGE_DELAY` wins.

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (`include/mimalloc.h`; the crate
/// exports no constant for it): milliseconds before freed pages are purged (default 1000).
/// Purging is driven by later allocations, so an idle sidecar would keep its start-up peak.
const PURGE_DELAY: mi_option_t = 15;

/// Call first thing in `main`, before other threads exist.
pub fn tune() {
    // Transparent huge pages would make every touched arena resident 2 MiB at a time (an idle
    // sidecar took 20 MB instead of 12). mimalloc is built not to ask for them (the `no_thp`
    // feature); where THP is on for every mapping (`always`), the process opts out here.
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a store into mimalloc's option table.
        unsafe { mi_option_set(PURGE_DELAY, 0) };
    }
}

#[cfg(test)]
mod tests {
    use libmimalloc_sys::mi_option_get;

    use super::*;

    #[test]
    fn the_option_number_names_the_purge_delay() {
        // Read before any `tune()`: mimalloc's documented default identifies the option.
        // SAFETY: a read of mimalloc's option table.
        assert_eq!(unsafe { mi_option_get(PURGE_DELAY) }, 1000);
    }
}
