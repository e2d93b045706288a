//! The allocator's settings: mimalloc (the binary's global allocator), built without
//! transparent huge pages.
//!
//! A sidecar's memory is paid once per pod, and its heap peaks at start-up and on reload (the
//! config being parsed, ten thousand tokens being fetched) and then falls. mimalloc gives the
//! freed pages of the fall back to the OS where glibc's malloc kept them: with 10,000 credentials
//! cached, 48 MB resident instead of 71 (BENCHMARKS.md, "What moved the figures"). Purging freed
//! pages at once (`purge_delay` 0) saved 8 MB more but cost a third of the throughput; a
//! periodic `mi_collect` saved nothing.

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
