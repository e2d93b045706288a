//! `token-sidecar probe`: asks a running sidecar's admin listener whether it is ready, for a
//! container `HEALTHCHECK` in an image that has no shell and no curl.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The admin listener to ask
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Ask `/healthz` (is the process serving?) instead of `/readyz` (can it serve requests?)
    #[arg(long)]
    pub live: bool,
    /// How long to wait for the answer
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Exit 0 when the answer is 2xx, 1 otherwise; one line on stdout either way.
pub async fn run(args: ProbeArgs) -> ExitCode {
    let path = if args.live { "/healthz" } else { "/readyz" };
    let url = format!("http://{}{path}", args.admin);
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(args.timeout)
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            println!("probe: cannot build a client: {err}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            println!("{url}: {status} {}", body.trim());
            if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            println!("{url}: no answer: {err}");
            ExitCode::FAILURE
        }
    }
}
