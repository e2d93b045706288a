//! The egress proxy (`[egress]`): token fetches and forwarded requests leave through a real
//! CONNECT proxy (tinyproxy), with `Proxy-Authorization` up front; `no_proxy` hosts are reached
//! directly; a refused tunnel is a 502 (upstream) or a failed fetch (token endpoint).

use crate::support::tinyproxy::Tinyproxy;
use crate::support::{Harness, ANY_PORT};

/// The PayU stand-in behind `/acme/payu`, its token endpoint named `token_host`, with `egress`.
fn config(s: &token_sidecar::dev::StandIns, token_host: &str, egress: &str) -> String {
    format!(
        r#"
[server]
listen = "{ANY_PORT}"
admin_listen = "{ANY_PORT}"

[egress]
{egress}

[providers.payu]
token_url = "https://{token_host}:{token_port}/oauth/token"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = "dev-payu-secret"
scopes = ["create_payment_links"]

[[routes]]
path_prefix = "/acme/payu"
upstream = "https://{upstream}/payu"
credential = "acme-payu"
"#,
        token_port = s.token_addr.port(),
        upstream = s.upstream_addr,
    )
}

#[tokio::test]
async fn token_fetches_and_requests_leave_through_the_proxy_unless_no_proxy_says() {
    let Some(proxy) = Tinyproxy::start(
        "token_fetches_and_requests_leave_through_the_proxy",
        Some(("egress", "pass-word")),
    ) else {
        return;
    };
    let egress = format!("proxy = \"{}\"\nproxy_auth = \"egress:pass-word\"", proxy.url());
    let h = Harness::with_config(|s| config(s, "127.0.0.1", &egress)).await;
    assert_eq!(h.get("/acme/payu/x").await.status(), 200);
    assert_eq!(
        proxy.tunnels_to(h.stand_ins.token_addr),
        1,
        "the token fetch went through the proxy"
    );
    assert_eq!(
        proxy.tunnels_to(h.stand_ins.upstream_addr),
        1,
        "the request went through the proxy"
    );

    let bypass = format!("{egress}\nno_proxy = [\"127.0.0.1\"]");
    let direct = Harness::with_config(|s| config(s, "127.0.0.1", &bypass)).await;
    assert_eq!(direct.get("/acme/payu/x").await.status(), 200);
    assert_eq!(
        proxy.tunnels_to(direct.stand_ins.token_addr),
        0,
        "no_proxy hosts are reached directly"
    );
    assert_eq!(proxy.tunnels_to(direct.stand_ins.upstream_addr), 0);
}

#[tokio::test]
async fn a_refused_tunnel_is_a_502_upstream_and_a_failed_fetch_token_side() {
    let Some(proxy) = Tinyproxy::start("a_refused_tunnel_is_a_502", Some(("egress", "pass-word"))) else {
        return;
    };
    // Wrong credentials: the proxy answers 407 to every CONNECT.
    let wrong = format!("proxy = \"{}\"\nproxy_auth = \"egress:wrong\"", proxy.url());
    let h = Harness::with_config(|s| config(s, "127.0.0.1", &wrong)).await;
    let (status, json) = h.get_json("/acme/payu/x").await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"]["code"], "token_unavailable");

    // The token endpoint reached directly (as `localhost`), the upstream through the proxy.
    let upstream_only = format!("{wrong}\nno_proxy = [\"localhost\"]");
    let h = Harness::with_config(|s| config(s, "localhost", &upstream_only)).await;
    let (status, json) = h.get_json("/acme/payu/x").await;
    assert_eq!(status, 502, "{json}");
    assert_eq!(json["error"]["code"], "upstream_unreachable");
}
