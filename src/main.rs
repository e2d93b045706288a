//! The `token-sidecar` binary: the tuned allocator, then the CLI.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    token_sidecar::allocator::tune();
    token_sidecar::cli::main()
}
