//! Prometheus metrics, all named `token_sidecar_*`. Labels are route names, credential names,
//! statuses and outcomes: never a token or a secret.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label value that shares the name it shows (a route's or a credential's): a series holds
/// no copy of the name, and recording one allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Name,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    pub credential: Name,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub credential: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: Name,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub credential: Name,
    pub state: &'static str,
}

/// One credential as a scrape sees it: its state (as `/tokens` names it) and, when it holds a
/// token, the seconds until that token expires (negative once it has).
pub struct CredentialReading {
    pub credential: Arc<str>,
    pub state: &'static str,
    pub expires_in_seconds: Option<f64>,
}

/// Every metric the sidecar records, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    token_fetches: Family<FetchLabels, Counter>,
    cache_hits: Family<CredentialLabels, Counter>,
    cache_misses: Family<CredentialLabels, Counter>,
    upstream_401_retries: Family<RouteLabels, Counter>,
    connections: Gauge,
    config_reloads: Family<OutcomeLabels, Counter>,
    config_info: Family<VersionLabels, Gauge>,
    shared_cache: Family<EventLabels, Counter>,
    fetches_throttled: Family<ProviderLabels, Counter>,
    trace_spans_dropped: Counter,
    errors: Family<ErrorLabels, Counter>,
    /// Set at each scrape, from the cache: one series per credential.
    credential_state: Family<StateLabels, Gauge>,
    token_expires_in: Family<CredentialLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// No series until a shared tier sets it: absent without `[cache.shared]`.
    shared_cache_up: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let token_fetches = Family::<FetchLabels, Counter>::default();
        let cache_hits = Family::<CredentialLabels, Counter>::default();
        let cache_misses = Family::<CredentialLabels, Counter>::default();
        let upstream_401_retries = Family::<RouteLabels, Counter>::default();
        let connections = Gauge::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        let config_info = Family::<VersionLabels, Gauge>::default();
        let shared_cache = Family::<EventLabels, Counter>::default();
        let shared_cache_up = Family::<Vec<(String, String)>, Gauge>::default();
        let fetches_throttled = Family::<ProviderLabels, Counter>::default();
        let trace_spans_dropped = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "token_sidecar_errors",
            "Requests the sidecar answered with its own JSON error, by route and error code",
            errors.clone(),
        );
        let credential_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "token_sidecar_credential_state",
            "1 for each credential's state: fresh, refreshing, failing (backing off), expired or empty",
            credential_state.clone(),
        );
        let token_expires_in =
            Family::<CredentialLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "token_sidecar_token_expires_in_seconds",
            "Seconds until each credential's cached token expires (negative once it has; absent with no token)",
            token_expires_in.clone(),
        );
        let start_time = Gauge::<i64>::default();
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs() as i64),
        );
        registry.register(
            "token_sidecar_start_time_seconds",
            "When this process started, in Unix seconds",
            start_time,
        );
        registry.register(
            "token_sidecar_trace_spans_dropped",
            "Trace spans not exported: the queue was full, or the collector failed or was slow",
            trace_spans_dropped.clone(),
        );
        registry.register(
            "token_sidecar_token_fetches_throttled",
            "Token requests that waited for (or were refused) a slot of their provider's max_fetch_rate",
            fetches_throttled.clone(),
        );
        registry.register(
            "token_sidecar_shared_cache_up",
            "1 while the fleet's Redis answers, 0 while this sidecar goes on alone (absent without [cache.shared])",
            shared_cache_up.clone(),
        );
        registry.register(
            "token_sidecar_shared_cache_events",
            "The fleet's shared cache ([cache.shared]): hit, miss, lock_wait, lock_timeout, redis_error, fallback, bad_key, forged",
            shared_cache.clone(),
        );
        registry.register(
            "token_sidecar_config_reloads",
            "Configuration reloads, by outcome (ok, invalid, error)",
            config_reloads.clone(),
        );
        registry.register(
            "token_sidecar_config_info",
            "1, labelled with the version (a short hash) of the configuration in use",
            config_info.clone(),
        );
        registry.register(
            "token_sidecar_requests",
            "Requests handled, by route (\"none\" when nothing matched) and status",
            requests.clone(),
        );
        registry.register(
            "token_sidecar_request_duration_seconds",
            "Time from request to response headers, by route",
            request_duration.clone(),
        );
        registry.register(
            "token_sidecar_token_fetches",
            "Token endpoint requests, by credential and outcome",
            token_fetches.clone(),
        );
        registry.register(
            "token_sidecar_token_cache_hits",
            "Requests served a cached token",
            cache_hits.clone(),
        );
        registry.register(
            "token_sidecar_token_cache_misses",
            "Requests that found no usable cached token",
            cache_misses.clone(),
        );
        registry.register(
            "token_sidecar_upstream_401_retries",
            "Requests resent with a fresh token after the upstream answered 401",
            upstream_401_retries.clone(),
        );
        registry.register(
            "token_sidecar_open_connections",
            "Client connections currently open on the proxy listener",
            connections.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            request_duration,
            token_fetches,
            cache_hits,
            cache_misses,
            upstream_401_retries,
            connections,
            config_reloads,
            config_info,
            shared_cache,
            shared_cache_up,
            fetches_throttled,
            trace_spans_dropped,
            errors,
            credential_state,
            token_expires_in,
        }
    }

    /// A request the sidecar answered itself, with the error `code`.
    pub fn error(&self, route: &Arc<str>, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                route: Name(route.clone()),
                code,
            })
            .inc();
    }

    /// The credentials as they are now (called before each scrape renders): the series of
    /// credentials no longer configured, and of states left, go.
    pub fn credentials_now(&self, readings: impl IntoIterator<Item = CredentialReading>) {
        self.credential_state.clear();
        self.token_expires_in.clear();
        for reading in readings {
            let credential = Name(reading.credential);
            self.credential_state
                .get_or_create(&StateLabels {
                    credential: credential.clone(),
                    state: reading.state,
                })
                .set(1);
            if let Some(seconds) = reading.expires_in_seconds {
                self.token_expires_in
                    .get_or_create(&CredentialLabels { credential })
                    .set(seconds);
            }
        }
    }

    pub fn trace_spans_dropped(&self, count: u64) {
        self.trace_spans_dropped.inc_by(count);
    }

    pub fn fetch_throttled(&self, provider: &Arc<str>) {
        self.fetches_throttled
            .get_or_create(&ProviderLabels {
                provider: Name(provider.clone()),
            })
            .inc();
    }

    pub fn shared_cache_up(&self, up: bool) {
        self.shared_cache_up.get_or_create(&Vec::new()).set(i64::from(up));
    }

    pub fn shared_cache(&self, event: &str) {
        self.shared_cache
            .get_or_create(&EventLabels {
                event: event.to_owned(),
            })
            .inc();
    }

    pub fn config_reload(&self, outcome: &str) {
        self.config_reloads
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Marks `version` as the configuration in use (and no other).
    pub fn config_loaded(&self, version: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
    }

    pub fn request(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        let route = Name(route.clone());
        self.request_duration
            .get_or_create(&RouteLabels { route: route.clone() })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    pub fn token_fetch(&self, credential: &Arc<str>, outcome: &'static str) {
        self.token_fetches
            .get_or_create(&FetchLabels {
                credential: Name(credential.clone()),
                outcome,
            })
            .inc();
    }

    pub fn cache_lookup(&self, credential: &Arc<str>, hit: bool) {
        let family = if hit { &self.cache_hits } else { &self.cache_misses };
        family
            .get_or_create(&CredentialLabels {
                credential: Name(credential.clone()),
            })
            .inc();
    }

    pub fn upstream_401_retry(&self, route: &Arc<str>) {
        self.upstream_401_retries
            .get_or_create(&RouteLabels {
                route: Name(route.clone()),
            })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
