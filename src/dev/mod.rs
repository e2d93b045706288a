//! `token-sidecar dev`, and the stand-ins it shares with the tests: a test CA ([`certs`]),
//! the four token endpoint shapes ([`providers`]), the record of issued tokens ([`issued`]) and
//! an echo upstream that accepts only valid issued tokens ([`upstream`]).

pub mod certs;
pub mod issued;
pub mod providers;
pub mod upstream;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::server;
use certs::TestPki;
use issued::IssuedTokens;
use providers::{Accounts, MockProviders};
use upstream::EchoUpstream;

/// The config `dev` runs, with placeholders for addresses.
pub const DEV_CONFIG_TEMPLATE: &str = include_str!("dev.toml");

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the sidecar listens for applications
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the admin listener (health, metrics, /tokens) listens
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,
}

/// The accounts the stand-ins accept; they match `dev.toml`.
pub fn dev_accounts() -> Accounts {
    let clients = [
        ("acme-setu-client", "dev-setu-secret"),
        ("acme-booking-client", "dev-booking-secret"),
        ("acme-payu-client", "dev-payu-secret"),
        ("globex-payu-client", "dev-globex-payu-secret"),
    ];
    Accounts {
        nuapay_api_key: "dev-nuapay-api-key".into(),
        nuapay_organisations: vec!["ybo8zd8j2q".into(), "k3v9x2mq7p".into()],
        clients: clients
            .iter()
            .map(|(id, secret)| (id.to_string(), secret.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

/// The stand-in token endpoints and upstream, serving TLS on 127.0.0.1 ports of their own.
pub struct StandIns {
    pub pki: TestPki,
    pub issued: Arc<IssuedTokens>,
    pub providers: Arc<MockProviders>,
    pub upstream: Arc<EchoUpstream>,
    /// `127.0.0.1:PORT` of the token endpoints.
    pub token_addr: SocketAddr,
    /// `127.0.0.1:PORT` of the echo upstream.
    pub upstream_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl StandIns {
    pub async fn start(clock: SharedClock, accounts: Accounts) -> anyhow::Result<Self> {
        let pki = TestPki::new()?;
        let issued = Arc::new(IssuedTokens::new(clock));
        let providers = MockProviders::new(issued.clone(), accounts);
        let upstream = EchoUpstream::new(issued.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let acceptor = pki.acceptor(&["127.0.0.1", "localhost"])?;
        let token_listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let upstream_listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let token_addr = token_listener.local_addr()?;
        let upstream_addr = upstream_listener.local_addr()?;
        let tasks = vec![
            tokio::spawn(server::serve(
                token_listener,
                Some(acceptor.clone()),
                providers.handler(),
                shutdown_rx.clone(),
                server::ConnectionLimits::default(),
                None,
            )),
            tokio::spawn(server::serve(
                upstream_listener,
                Some(acceptor),
                upstream.handler(),
                shutdown_rx,
                server::ConnectionLimits::default(),
                None,
            )),
        ];
        Ok(Self {
            pki,
            issued,
            providers,
            upstream,
            token_addr,
            upstream_addr,
            shutdown,
            tasks,
        })
    }

    /// `DEV_CONFIG_TEMPLATE` filled in with these stand-ins' addresses.
    pub fn config_toml(&self, listen: SocketAddr, admin: SocketAddr) -> String {
        DEV_CONFIG_TEMPLATE
            .replace("@TOKEN@", &self.token_addr.to_string())
            .replace("@UPSTREAM@", &self.upstream_addr.to_string())
            .replace("@LISTEN@", &listen.to_string())
            .replace("@ADMIN@", &admin.to_string())
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut signals = server::Signals::install()?;
    let clock: SharedClock = Arc::new(SystemClock);
    let stand_ins = StandIns::start(clock.clone(), dev_accounts()).await?;
    let text = stand_ins.config_toml(args.listen, args.admin_listen);
    let mut config =
        Config::from_toml(&text, Path::new("<dev config>")).context("the embedded dev config is invalid")?;
    config.extra_roots.push(stand_ins.pki.ca_der());
    let sidecar = server::start(config, clock).await?;
    print_try_lines(
        sidecar.proxy_addr,
        sidecar.admin_addr.unwrap_or(args.admin_listen),
    );
    while signals.next().await == server::Signal::Reload {
        tracing::info!("dev runs its embedded config: there is nothing to reload");
    }
    tracing::info!("shutting down");
    sidecar.shutdown().await;
    stand_ins.shutdown().await;
    Ok(())
}

fn print_try_lines(proxy: SocketAddr, admin: SocketAddr) {
    let lines = [
        format!("# Nuapay (10 s tokens, Bearer):\ncurl -s http://{proxy}/acme/nuapay/payments?limit=1"),
        format!("# Nuapay, token as Basic username (the refunds call):\ncurl -s -X POST http://{proxy}/globex/nuapay/refunds"),
        format!("# Setu (expiry read from the JWT):\ncurl -s http://{proxy}/acme/setu/bills"),
        format!("# Booking API (JSON token request, token in X-Auth-Token):\ncurl -s -X POST -H 'Content-Type: application/json' -d '{{\"guests\":2}}' http://{proxy}/acme/booking/bookings"),
        format!("# PayU (form token request with scopes):\ncurl -s http://{proxy}/acme/payu/payment-links"),
        format!("# PayU by Host, the sidecar as HTTP proxy:\ncurl -s -x http://{proxy} http://payu.acme.localhost/payment-links"),
        format!("# One route, merchant chosen by header:\ncurl -s -H 'X-Merchant: globex-nuapay' http://{proxy}/nuapay/payments"),
        format!("# Cached tokens (fingerprints only) and metrics:\ncurl -s http://{admin}/tokens\ncurl -s http://{admin}/metrics"),
    ];
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "token-sidecar dev: proxy on http://{proxy}, admin on http://{admin}; stand-in providers and upstream on 127.0.0.1.\nTry:\n"
    );
    for line in lines {
        let _ = writeln!(out, "{line}\n");
    }
    let _ = writeln!(out, "Ctrl-C to stop.");
    let _ = out.flush();
}
