//! Reload on the real binary: SIGHUP, `POST /config/reload` and watched files; what keeps its
//! token and what does not; requests in flight; 50 reloads under traffic; the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use token_sidecar::clock::ManualClock;
use token_sidecar::dev::providers::Shape;
use token_sidecar::dev::{dev_accounts, StandIns};

use crate::support::binary::{eventually, replace_file, BinarySidecar};
use crate::support::spawn_tls_server;

async fn stand_ins() -> StandIns {
    StandIns::start(ManualClock::new(), dev_accounts()).await.unwrap()
}

/// The PayU and booking stand-ins behind two routes; `extra` is appended.
fn config(s: &StandIns, server: &str, payu_scopes: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}

[tls]
ca_file = "ca.pem"

[providers.payu]
token_url = "https://{token}/oauth/token"

[providers.booking]
token_url = "https://{token}/api/oauth/token"
body = "json"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = {{ file = "secrets/payu" }}
scopes = [{payu_scopes}]

[credentials.acme-booking]
provider = "booking"
client_id = "acme-booking-client"
client_secret = "dev-booking-secret"

[[routes]]
path_prefix = "/acme/payu"
upstream = "https://{upstream}/payu"
credential = "acme-payu"

[[routes]]
path_prefix = "/acme/booking"
upstream = "https://{upstream}/booking"
credential = "acme-booking"
{extra}
"#,
        token = s.token_addr,
        upstream = s.upstream_addr,
    )
}

const SCOPES: &str = r#""create_payment_links""#;

#[tokio::test]
async fn sighup_adds_a_route_and_an_unchanged_credential_keeps_its_token() {
    let s = stand_ins().await;
    let base = config(&s, "watch_config = false", SCOPES, "");
    let sidecar = BinarySidecar::start(&s, &base);
    assert_eq!(sidecar.get("/acme/payu/x").await.status(), 200);
    let before = sidecar.fingerprint("acme-payu").await;
    assert_eq!(sidecar.get("/v2/payu/x").await.status(), 404);

    let added = format!(
        "{base}\n[[routes]]\npath_prefix = \"/v2/payu\"\nupstream = \"https://{}/payu\"\ncredential = \"acme-payu\"\n",
        s.upstream_addr
    );
    replace_file(&sidecar.config_path(), &added);
    sidecar.signal("-HUP");
    eventually("the new route answers", async || {
        sidecar.get("/v2/payu/x").await.status() == 200
    })
    .await;
    assert_eq!(
        s.providers.token_requests(Shape::PayU),
        1,
        "no new fetch for an unchanged credential"
    );
    assert_eq!(sidecar.fingerprint("acme-payu").await, before);
    assert!(
        sidecar.child.id() > 0 && sidecar.get("/acme/payu/x").await.status() == 200,
        "still running"
    );
}

#[tokio::test]
async fn an_invalid_config_is_refused_with_422_and_the_old_one_keeps_serving() {
    let s = stand_ins().await;
    let base = config(&s, "watch_config = false", SCOPES, "");
    let sidecar = BinarySidecar::start(&s, &base);
    assert_eq!(sidecar.get("/acme/payu/x").await.status(), 200);
    let broken = base
        .replace("listen = ", "listne = ")
        .replace("credential = \"acme-booking\"", "credential = \"acme-bokking\"");
    replace_file(&sidecar.config_path(), &broken);
    let (status, body) = sidecar.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let problems: Vec<&str> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("server.listne: unknown field")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no credential named `acme-bokking`")),
        "{problems:?}"
    );
    assert_eq!(
        sidecar.get("/acme/payu/x").await.status(),
        200,
        "the old config serves"
    );
    assert_eq!(sidecar.get("/acme/booking/x").await.status(), 200);
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("token_sidecar_config_reloads_total{outcome=\"invalid\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_within_seconds_without_a_signal() {
    let s = stand_ins().await;
    let sidecar = BinarySidecar::start(&s, &config(&s, "", SCOPES, ""));
    assert_eq!(sidecar.get("/acme/payu/x").await.status(), 200);
    let version = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("token_sidecar_config_info{"))
            .map(str::to_owned)
    };
    let first_version = version(&sidecar.metrics().await);

    for (rotated, replace) in [("rotated-by-rename", true), ("rotated-in-place", false)] {
        s.providers.rotate_secret("acme-payu-client", rotated);
        let secret = sidecar.dir.path().join("secrets/payu");
        if replace {
            replace_file(&secret, &format!("{rotated}\n"));
        } else {
            std::fs::write(&secret, format!("{rotated}\n")).unwrap();
        }
        eventually("the next fetch uses the new secret", async || {
            let ok = sidecar.get("/acme/payu/x").await.status() == 200;
            let used = s
                .providers
                .seen()
                .last()
                .is_some_and(|seen| seen.body.contains(&format!("client_secret={rotated}")));
            ok && used
        })
        .await;
    }
    assert_ne!(
        version(&sidecar.metrics().await),
        first_version,
        "config_info shows the new version"
    );
    assert_eq!(
        s.providers.token_requests(Shape::Booking),
        0,
        "an untouched credential fetched nothing"
    );
}

#[tokio::test]
async fn a_route_removed_during_a_slow_request_lets_it_finish() {
    let s = stand_ins().await;
    let handler: token_sidecar::server::Handler = Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            http::Response::new(token_sidecar::body::full_body("slow answer"))
        })
    });
    let slow = spawn_tls_server(&s.pki, handler).await;
    let slow_route = format!(
        "[[routes]]\npath_prefix = \"/slow\"\nupstream = \"https://{slow}\"\ncredential = \"acme-payu\"\n"
    );
    let base = config(&s, "watch_config = false", SCOPES, "");
    let sidecar = Arc::new(BinarySidecar::start(&s, &format!("{base}\n{slow_route}")));
    let in_flight = tokio::spawn({
        let sidecar = sidecar.clone();
        async move {
            let response = sidecar.get("/slow/x").await;
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    replace_file(&sidecar.config_path(), &base);
    assert_eq!(sidecar.reload().await.0, 200);
    assert_eq!(
        sidecar.get("/slow/x").await.status(),
        404,
        "new requests find no route"
    );
    assert_eq!(
        in_flight.await.unwrap(),
        (200, "slow answer".to_owned()),
        "the request in flight finished"
    );
}

#[tokio::test]
async fn changed_scopes_get_a_new_token_and_an_untouched_credential_keeps_its_own() {
    let s = stand_ins().await;
    let sidecar = BinarySidecar::start(&s, &config(&s, "watch_config = false", SCOPES, ""));
    for path in ["/acme/payu/x", "/acme/booking/x"] {
        assert_eq!(sidecar.get(path).await.status(), 200);
    }
    let (payu, booking) = (
        sidecar.fingerprint("acme-payu").await,
        sidecar.fingerprint("acme-booking").await,
    );
    let wider = format!("{SCOPES}, \"read_payment_links\"");
    replace_file(
        &sidecar.config_path(),
        &config(&s, "watch_config = false", &wider, ""),
    );
    assert_eq!(sidecar.reload().await.0, 200);
    assert_eq!(
        sidecar.fingerprint("acme-payu").await,
        None,
        "the changed credential's token is gone"
    );
    for path in ["/acme/payu/x", "/acme/booking/x"] {
        assert_eq!(sidecar.get(path).await.status(), 200);
    }
    assert_ne!(sidecar.fingerprint("acme-payu").await, payu);
    assert_eq!(sidecar.fingerprint("acme-booking").await, booking);
    assert_eq!(s.providers.token_requests(Shape::PayU), 2);
    assert_eq!(s.providers.token_requests(Shape::Booking), 1);
    let last = s
        .providers
        .seen()
        .into_iter()
        .rev()
        .find(|r| r.shape == Shape::PayU)
        .unwrap();
    assert!(
        last.body
            .contains("scope=create_payment_links+read_payment_links"),
        "{}",
        last.body
    );
}

#[tokio::test]
async fn fifty_reloads_under_steady_traffic_fail_no_request_and_fetch_nothing_new() {
    let s = stand_ins().await;
    let extra_route = format!(
        "[[routes]]\npath_prefix = \"/extra\"\nupstream = \"https://{}/payu\"\ncredential = \"acme-payu\"\n",
        s.upstream_addr
    );
    let versions = [
        config(&s, "watch_config = false", SCOPES, ""),
        config(&s, "watch_config = false", SCOPES, &extra_route),
    ];
    let sidecar = Arc::new(BinarySidecar::start(&s, &versions[0]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = ["/acme/payu/x", "/acme/booking/x"]
        .into_iter()
        .map(|path| {
            let (sidecar, stop) = (sidecar.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match sidecar.get(path).await.status().as_u16() {
                        200 => served += 1,
                        other => failed.push(other),
                    }
                }
                (served, failed)
            })
        })
        .collect();
    let started = Instant::now();
    for n in 0..50 {
        replace_file(&sidecar.config_path(), &versions[n % 2]);
        let (status, body) = sidecar.reload().await;
        assert_eq!(status, 200, "reload {n}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloading = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for task in traffic {
        let (count, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "failed requests during reloads: {failed:?}");
        served += count;
    }
    eprintln!(
        "50 reloads in {reloading:?} under traffic: {served} requests served, 0 failed, {} PayU and {} booking token fetches",
        s.providers.token_requests(Shape::PayU),
        s.providers.token_requests(Shape::Booking)
    );
    assert!(served > 50, "traffic ran during the reloads: {served}");
    assert_eq!(s.providers.token_requests(Shape::PayU), 1);
    assert_eq!(s.providers.token_requests(Shape::Booking), 1);
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("token_sidecar_config_reloads_total{outcome=\"ok\"} 50"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_without_query_or_secret() {
    let s = stand_ins().await;
    let sidecar = BinarySidecar::start(&s, &config(&s, "watch_config = false", SCOPES, ""));
    let response = sidecar
        .client
        .post(format!(
            "http://{}/acme/payu/payments?card=4111111111111111&name=ada",
            sidecar.proxy
        ))
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(sidecar.get("/nowhere").await.status(), 404);
    let fingerprint = sidecar.fingerprint("acme-payu").await.unwrap();
    eventually("two access lines", async || sidecar.access_lines().len() >= 2).await;
    let lines = sidecar.access_lines();
    let ok = &lines[0]["fields"];
    assert_eq!(ok["route"], "/acme/payu");
    assert_eq!(ok["credential"], "acme-payu");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/acme/payu/payments");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["upstream_status"], 200);
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(ok["bytes_in"], 10);
    assert_eq!(ok["bytes_out"], body.len() as u64);
    assert_eq!(ok["token"], fingerprint.as_str());
    assert_eq!(ok["replayed"], false);
    assert_eq!(ok["error"], "-");
    let refused = &lines[1]["fields"];
    assert_eq!(
        (refused["status"].as_u64(), refused["error"].as_str()),
        (Some(404), Some("no_route"))
    );
    let all = sidecar.logs.lock().unwrap().join("\n");
    for never in ["4111111111111111", "card=", "name=ada", "dev-payu-secret"] {
        assert!(!all.contains(never), "`{never}` in the logs");
    }
}

/// A Nuapay credential whose tokens are revoked when dropped, behind `/acme/nuapay`.
fn nuapay_config(s: &StandIns, expires_in: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
watch_config = false

[tls]
ca_file = "ca.pem"

[providers.nuapay]
kind = "nuapay"
base_url = "https://{token}"
api_key = "dev-nuapay-api-key"
expires_in = "{expires_in}"
revoke_on_shutdown = true

[credentials.acme-nuapay]
provider = "nuapay"
organisation = "ybo8zd8j2q"
scopes = ["openbanking_pisp"]

[[routes]]
path_prefix = "/acme/nuapay"
upstream = "https://{upstream}/nuapay"
credential = "acme-nuapay"
"#,
        token = s.token_addr,
        upstream = s.upstream_addr,
    )
}

/// A reload that changes a credential whose old token is revoked slowly: requests routed by
/// the old snapshot share one fetch (no fetch each), the revoke never sits between the swaps,
/// and the old token is revoked once.
#[tokio::test]
async fn a_reload_changing_a_credential_under_load_makes_one_new_fetch_and_one_revoke() {
    let s = stand_ins().await;
    s.providers.set_revoke_latency(Duration::from_secs(3));
    let sidecar = Arc::new(BinarySidecar::start(&s, &nuapay_config(&s, "1h")));
    assert_eq!(sidecar.get("/acme/nuapay/x").await.status(), 200);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (sidecar, stop) = (sidecar.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match sidecar.get("/acme/nuapay/x").await.status().as_u16() {
                        200 => served += 1,
                        _ => failed += 1,
                    }
                }
                (served, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = s.providers.token_requests(Shape::Nuapay);
    replace_file(&sidecar.config_path(), &nuapay_config(&s, "59m"));
    let reload_started = Instant::now();
    let (status, body) = sidecar.reload().await;
    let reload_took = reload_started.elapsed();
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut served, mut failed) = (0, 0);
    for task in load {
        let (ok, bad) = task.await.unwrap();
        served += ok;
        failed += bad;
    }
    let fetches = s.providers.token_requests(Shape::Nuapay) - before;
    eventually("the old token revoked", async || {
        s.providers.revocations().len() == 1
    })
    .await;
    eprintln!("reload changing a credential under 8 connections: {served} requests, {failed} failed, {fetches} token call(s), {} revoke(s); the reload answered in {reload_took:?}", s.providers.revocations().len());
    assert_eq!(failed, 0);
    assert_eq!(fetches, 1, "one fetch for the changed credential");
    assert!(
        reload_took < Duration::from_secs(2),
        "the reload did not wait for the revoke"
    );
}

/// A Kubernetes volume remounted: the secrets directory removed and made again. The watch on
/// it is made again, and a change after that still reloads.
#[tokio::test]
async fn a_watched_directory_removed_and_made_again_is_watched_again() {
    let s = stand_ins().await;
    let sidecar = BinarySidecar::start(&s, &config(&s, "", SCOPES, ""));
    assert_eq!(sidecar.get("/acme/payu/x").await.status(), 200);
    let secrets = sidecar.dir.path().join("secrets");
    std::fs::remove_dir_all(&secrets).unwrap();
    // The watcher notices the loss within its recheck period, and watches the new directory.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::create_dir(&secrets).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.providers.rotate_secret("acme-payu-client", "after-the-remount");
    std::fs::write(secrets.join("payu"), "after-the-remount\n").unwrap();
    eventually("the new secret is used without a signal", async || {
        let ok = sidecar.get("/acme/payu/x").await.status() == 200;
        ok && s
            .providers
            .seen()
            .last()
            .is_some_and(|seen| seen.body.contains("client_secret=after-the-remount"))
    })
    .await;
    let logs = sidecar.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("watching it once it is back") || logs.contains("removed or replaced"),
        "the lost watch was logged"
    );
}

/// The log file written into the watched config directory at trace level is no change: the
/// watcher does not react to its own log lines.
#[tokio::test]
async fn a_log_file_beside_the_config_does_not_feed_the_watcher() {
    let s = stand_ins().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), s.pki.ca_pem()).unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/payu"), "dev-payu-secret\n").unwrap();
    std::fs::write(dir.path().join("sidecar.toml"), config(&s, "", SCOPES, "")).unwrap();
    let log = dir.path().join("sidecar.log");
    let mut child = std::process::Command::new(crate::support::binary())
        .args(["run", "--config"])
        .arg(dir.path().join("sidecar.toml"))
        .env("TOKEN_SIDECAR_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    eventually("the sidecar starts", async || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("token-sidecar listening"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = size();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = size() - settled;
    let _ = child.kill();
    let _ = child.wait();
    let reloads = std::fs::read_to_string(&log)
        .unwrap()
        .matches("a watched config file changed")
        .count();
    eprintln!("trace log beside the config: it grew {grown} bytes in 3 s while idle, {reloads} reload(s)");
    assert_eq!(reloads, 0);
    assert!(grown < 1 << 20, "the log grew {grown} bytes in 3 s while idle");
}
