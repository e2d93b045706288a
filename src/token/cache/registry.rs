//! The configured credentials, by name and by identity, and what the cache knows of fetching
//! each identity's tokens: replaced whole by a reload, keeping the state of unchanged identities.

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use super::super::error::FetchError;
use super::super::source::TokenSource;
use crate::clock::from_unix_millis;
use crate::token::dialect::Identity;
use crate::token::spec::CredentialSpec;

/// The refresher keeps a credential warm if it was used within this long at least.
const RECENT_USE_MIN: Duration = Duration::from_secs(60);

/// One configured credential, as the current configuration defines it.
pub(super) struct CredentialState {
    pub(super) spec: Arc<CredentialSpec>,
    /// Shared by every credential with the same identity, and kept across reloads while the
    /// identity stays.
    pub(super) fetch: Arc<FetchState>,
}

impl CredentialState {
    pub(super) fn new(spec: Arc<CredentialSpec>, fetch: Arc<FetchState>) -> Self {
        Self { spec, fetch }
    }

    /// The token endpoint's `host[:port]`, for errors (worked out when one happens, not held
    /// for every credential).
    pub(super) fn endpoint(&self) -> &str {
        &self.spec.request.url[url::Position::BeforeHost..url::Position::AfterPort]
    }
}

/// What the cache knows of fetching one identity's tokens.
#[derive(Default)]
pub(super) struct FetchState {
    pub(super) refreshing: AtomicBool,
    /// When the refresher next needs to look at this identity's token (Unix ms on our clock):
    /// 0 (at once) while there is none, its refresh time once one is stored, the end of a
    /// back-off after a failure, never once the refresher has let an idle credential's token
    /// come due (the request path refreshes it if it is used again). Each tick skips, with one
    /// load, every token not yet due; it used to look each one up, and with 100,000
    /// credentials the scan took most of a core.
    pub(super) next_look_ms: AtomicU64,
    /// When a request last asked for this credential's token (Unix ms on our clock; 0 = never).
    pub(super) last_used_ms: AtomicU64,
    /// Fetches and refusals; one per credential, so kept small (128 bytes with the `Arc`).
    pub(super) status: Mutex<FetchStatus>,
    /// Consecutive upstream refusals of freshly fetched tokens (0 in the normal case, so the
    /// request path checks it without a lock).
    pub(super) refused_streak: AtomicU32,
}

impl FetchState {
    /// The refresher is to look again at `at` (`None`: only once a new token is stored);
    /// returns it in Unix ms.
    pub(super) fn look_again(&self, at: Option<SystemTime>) -> u64 {
        let millis = at.map_or(u64::MAX, crate::clock::unix_millis);
        self.next_look_ms.store(millis, Ordering::Relaxed);
        millis
    }

    /// Whether the refresher may skip this identity at `now`.
    #[cfg(test)]
    pub(super) fn not_due(&self, now: SystemTime) -> bool {
        self.next_look_ms.load(Ordering::Relaxed) > crate::clock::unix_millis(now)
    }

    /// Used within the last quarter of its token's lifetime (at least the last minute): in
    /// steady use, and worth keeping warm.
    pub(super) fn recently_used(&self, now: SystemTime, lifetime: Duration) -> bool {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        last != 0 && from_unix_millis(last) + (lifetime / 4).max(RECENT_USE_MIN) >= now
    }
}

#[derive(Default)]
pub(super) struct FetchStatus {
    /// Requests sent to the token endpoint.
    pub(super) attempts: u64,
    /// Attempts that gave a usable token.
    pub(super) successes: u64,
    pub(super) consecutive_failures: u32,
    /// The end of the back-off, for background fetches,
    pub(super) retry_not_before: Option<SystemTime>,
    /// and when a request with no usable token may probe before it.
    pub(super) probe_not_before: Option<SystemTime>,
    /// Boxed: most credentials never fail.
    pub(super) last_error: Option<Box<FetchError>>,
    /// Upstream refusals (401s) of this credential's tokens, so that an upstream that refuses
    /// every token does not turn every request into a token fetch: the newest token generation
    /// purged after a refusal,
    pub(super) purged_generation: u64,
    /// when that generation was first refused (Unix ms): the replays of its refusals take
    /// tokens issued since (a revocation refuses every token issued before it),
    pub(super) purged_at_ms: u64,
    /// and while set and in the future, refusals are passed back without purging.
    pub(super) suppressed_until: Option<SystemTime>,
}

/// The configured credentials and the client that fetches their tokens; replaced whole by a
/// reload.
pub(super) struct Registry {
    pub(super) by_name: ByName,
    pub(super) by_identity: HashMap<Identity, Arc<CredentialState>>,
    pub(super) source: Arc<dyn TokenSource>,
}

impl Registry {
    /// The registry for `credentials`, keeping the fetch state of every identity that `old`
    /// knew.
    pub(super) fn new(
        credentials: &[Arc<CredentialSpec>],
        source: Arc<dyn TokenSource>,
        old: Option<&Registry>,
    ) -> Self {
        let mut by_name = Vec::with_capacity(credentials.len());
        let mut by_identity: HashMap<Identity, Arc<CredentialState>> = HashMap::default();
        for spec in credentials {
            let fetch = by_identity
                .get(&spec.identity)
                .or_else(|| old.and_then(|old| old.by_identity.get(&spec.identity)))
                .map(|state| state.fetch.clone())
                .unwrap_or_default();
            let state = Arc::new(CredentialState::new(spec.clone(), fetch));
            by_identity.insert(spec.identity, state.clone());
            by_name.push(state);
        }
        Self {
            by_name: ByName::new(by_name),
            by_identity,
            source,
        }
    }
}

/// The credentials a configuration defines, as one request snapshot holds them: a request
/// looks its credential up here, not in whatever a reload installed since it started, so
/// that it shares its credential's fetch in flight whatever happens meanwhile.
#[derive(Clone)]
pub struct Credentials(Arc<Registry>);

impl Credentials {
    pub(super) fn new(registry: Arc<Registry>) -> Self {
        Self(registry)
    }

    pub(super) fn registry(&self) -> &Arc<Registry> {
        &self.0
    }

    /// The state of `spec`'s identity (every credential a snapshot's routes name is here).
    pub(super) fn state(&self, spec: &CredentialSpec) -> Option<&Arc<CredentialState>> {
        self.0.by_identity.get(&spec.identity)
    }

    pub(super) fn source(&self) -> &Arc<dyn TokenSource> {
        &self.0.source
    }
}

/// The credentials a reload replaced, and those that replaced them: what
/// [`super::TokenCache::retire`] needs to drop the tokens of removed identities.
pub struct Replaced {
    old: Arc<Registry>,
    new: Arc<Registry>,
}

impl Replaced {
    pub(super) fn new(old: Arc<Registry>, new: Arc<Registry>) -> Self {
        Self { old, new }
    }

    pub(super) fn into_parts(self) -> (Arc<Registry>, Arc<Registry>) {
        (self.old, self.new)
    }

    /// What changed, by credential name.
    pub fn applied(&self) -> Applied {
        let mut applied = Applied::default();
        for state in self.new.by_name.values() {
            let name = &state.spec.name;
            match self.old.by_name.get(name) {
                Some(before) if before.spec.identity == state.spec.identity => {
                    applied.kept.push(name.clone())
                }
                Some(_) | None => applied.changed.push(name.clone()),
            }
        }
        for state in self.old.by_name.values() {
            if !self.new.by_name.contains_key(&state.spec.name) {
                applied.removed.push(state.spec.name.clone());
            }
        }
        applied
    }
}

/// A removed identity that old snapshots may still fetch tokens for.
pub(super) struct Retired {
    /// Held weakly: once no snapshot holds it, nothing can fetch for it any more.
    held: Weak<CredentialState>,
    pub(super) spec: Arc<CredentialSpec>,
    pub(super) source: Arc<dyn TokenSource>,
}

impl Retired {
    pub(super) fn new(state: &Arc<CredentialState>, source: Arc<dyn TokenSource>) -> Self {
        Self {
            held: Arc::downgrade(state),
            spec: state.spec.clone(),
            source,
        }
    }

    /// Whether no snapshot holds its credentials any more.
    pub(super) fn unheld(&self) -> bool {
        self.held.strong_count() == 0
    }
}

/// The credentials sorted by name: a slice searched by halves, an eighth of a `BTreeMap`'s
/// size with 10,000 credentials.
pub(super) struct ByName(Box<[Arc<CredentialState>]>);

impl ByName {
    pub(super) fn new(mut states: Vec<Arc<CredentialState>>) -> Self {
        states.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        // Names are unique: they are the keys of `[credentials]`.
        states.dedup_by(|a, b| a.spec.name == b.spec.name);
        Self(states.into_boxed_slice())
    }

    pub(super) fn get(&self, name: &str) -> Option<&Arc<CredentialState>> {
        let found = self.0.binary_search_by(|state| (*state.spec.name).cmp(name));
        found.ok().map(|index| &self.0[index])
    }

    pub(super) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// In name order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<CredentialState>> {
        self.0.iter()
    }
}

/// What a reload changed in the cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Credentials whose cached token carries over.
    pub kept: Vec<Arc<str>>,
    /// Credentials that are new or whose identity changed: a new token on next use.
    pub changed: Vec<Arc<str>>,
    /// Credentials no longer configured.
    pub removed: Vec<Arc<str>>,
}
