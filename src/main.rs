fn main() -> std::process::ExitCode {
    token_sidecar::cli::main()
}
