//! The allocator's settings: mimalloc (the binary's global allocator), built without
//! transparent huge pages, purging freed pages at once while a configuration loads and after a
//! burst of token fetches.
//!
//! A sidecar's memory is paid once per pod, and its heap peaks when a configuration is parsed
//! (the TOML document is some 25 times the file) and then falls. mimalloc gives the freed pages
//! of the fall back to the OS where glibc's malloc kept them: with 10,000 credentials cached, 46
//! MB resident instead of 71, and 40 when it purges at once while loading (BENCHMARKS.md, "What
//! moved the figures"). While serving, purging waits mimalloc's default second: purging at once
//! there cost a third of the throughput.

use std::ffi::c_long;

use libmimalloc_sys::{mi_collect, mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (`include/mimalloc.h`; the crate
/// exports no constant for it): milliseconds before freed pages are given back.
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
}

/// Gives the pages freed so far back to the OS now (a burst of token fetches just ended).
/// mimalloc purges freed pages only as it next allocates, and an idle sidecar hardly does: the
/// ten thousand fetches of a prefetch left 4 MB resident until then (BENCHMARKS.md). A no-op
/// when mimalloc is not the allocator.
pub fn give_back_freed_memory() {
    // SAFETY: mimalloc's own collection of this thread's heap and of the shared arenas.
    unsafe { mi_collect(true) };
}

/// While alive, freed pages go back to the OS at once (a configuration being loaded); then the
/// delay before is back (mimalloc's default, or the operator's `MIMALLOC_PURGE_DELAY`). A
/// no-op when mimalloc is not the allocator.
#[must_use = "purging at once lasts as long as the guard"]
pub struct PurgeAtOnce {
    delay_before: c_long,
}

impl PurgeAtOnce {
    pub fn begin() -> Self {
        let delay_before = purge_delay();
        set_purge_delay(0);
        Self { delay_before }
    }
}

impl Drop for PurgeAtOnce {
    fn drop(&mut self) {
        set_purge_delay(self.delay_before);
    }
}

fn purge_delay() -> c_long {
    // SAFETY: a read of mimalloc's option table.
    unsafe { mi_option_get(PURGE_DELAY) }
}

fn set_purge_delay(milliseconds: c_long) {
    // SAFETY: a store into mimalloc's option table (an atomic word).
    unsafe { mi_option_set(PURGE_DELAY, milliseconds) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purging_at_once_lasts_as_long_as_the_guard() {
        // The option number names the purge delay: its documented default (1 s) reads back.
        assert_eq!(purge_delay(), 1000);
        let loading = PurgeAtOnce::begin();
        assert_eq!(purge_delay(), 0);
        drop(loading);
        assert_eq!(purge_delay(), 1000);
    }
}
