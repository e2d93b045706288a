//! Raw config → validated [`Config`], collecting every problem with its line and key path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::locate::{self, KeyPath, SourceMap};
use crate::config::raw::RawConfig;
use crate::config::{Config, Problem};
use crate::tls::ClientIdentity;
use crate::token::spec::CredentialSpec;

mod providers;
mod routes;
mod settings;
mod telemetry;
mod values;

use providers::ProviderDraft;

/// The source map and the parsed raw config, parsed on a thread of its own: the TOML document
/// (some 25 times the file) and the raw values fill that thread's pages, which go back whole
/// when they are dropped instead of sharing pages with the validated config that stays. On
/// this thread if no thread can be started.
fn parse_apart(source: &str) -> (SourceMap, (Option<RawConfig>, Vec<Problem>)) {
    let parse_here = || {
        let map = SourceMap::new(source);
        let parsed = parse(source, &map);
        (map, parsed)
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("config-parse".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, parse_here);
        match thread {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => parse_here(),
        }
    })
}

/// The main thread's usual stack: the parser recurses into nested tables and arrays.
const PARSE_STACK: usize = 8 << 20;

/// The validated config (its `warnings` not yet rendered) and the warnings.
pub(super) fn validate(source: &str, base_dir: &Path) -> Result<(Config, Vec<Problem>), Vec<Problem>> {
    let (map, (raw, shape_problems)) = parse_apart(source);
    let mut v = Validator {
        map,
        identities: BTreeMap::new(),
        read: Sha256::new(),
        files: Vec::new(),
        removed: shape_problems.iter().map(|p| p.key_path.clone()).collect(),
        problems: shape_problems,
        base_dir: base_dir.to_owned(),
        shared_cache: false,
        warnings: Vec::new(),
    };
    // With the keys that had shape problems removed, the rest is still checked: one run
    // reports every problem.
    let Some(raw) = raw else {
        return Err(v.problems);
    };
    let root = KeyPath::root();

    let server = v.server(&root.key("server"), &raw.server);
    let extra_roots = v.tls(&root.key("tls"), &raw.tls);
    let cache = v.cache(&root.key("cache"), &raw.cache);
    let egress = raw
        .egress
        .as_ref()
        .and_then(|egress| v.egress(&root.key("egress"), egress));
    for (name, identity) in &raw.identities {
        let parsed = v.identity(&root.key("identities").key(name), name, identity);
        v.identities.insert(name.clone(), parsed);
    }
    let shared = raw
        .cache
        .shared
        .as_ref()
        .and_then(|shared| v.shared_cache(&root.key("cache").key("shared"), shared));
    v.shared_cache = raw.cache.shared.is_some();
    let providers: BTreeMap<&str, Option<ProviderDraft>> = raw
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.as_str(),
                v.provider(&root.key("providers").key(name), name, p),
            )
        })
        .collect();
    let credentials: BTreeMap<&str, Option<Arc<CredentialSpec>>> = raw
        .credentials
        .iter()
        .map(|(name, c)| {
            let spec = v.credential(&root.key("credentials").key(name), name, c, &providers);
            (name.as_str(), spec)
        })
        .collect();
    let routes = v.routes(&root.key("routes"), &raw.routes, &credentials);
    let telemetry = v.telemetry(&root.key("telemetry"), &raw.telemetry);

    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let (Some(server), Some(extra_roots), Some(cache)) = (server, extra_roots, cache) else {
        return Err(vec![internal_problem()]);
    };
    let warnings = v.warnings;
    let config = Config {
        server,
        extra_roots,
        cache,
        shared,
        egress,
        providers: providers
            .into_values()
            .flatten()
            .map(|draft| draft.spec)
            .collect(),
        credentials: credentials.into_values().flatten().collect(),
        routes,
        telemetry,
        version: version(source, v.read),
        files: v.files,
        warnings: Vec::new(),
    };
    Ok((config, warnings))
}

/// The first 12 hex characters of the SHA-256 of the text and the files it read.
fn version(source: &str, files: Sha256) -> String {
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(source.as_bytes()));
    hasher.update(files.finalize());
    hex::encode(hasher.finalize())[..12].to_owned()
}

fn internal_problem() -> Problem {
    Problem {
        line: None,
        key_path: String::new(),
        message: "internal error: validation failed without naming a problem".into(),
    }
}

/// TOML syntax and shape (unknown keys, wrong types). serde stops at the first such problem, so
/// each one found is removed from a copy of the document and parsing tried again, until it
/// succeeds: every shape problem is reported at once, with the document that remains (a
/// syntax error stops the search, and leaves no document).
fn parse(source: &str, map: &SourceMap) -> (Option<RawConfig>, Vec<Problem>) {
    const MAX_PROBLEMS: usize = 100;
    let mut problems = Vec::new();
    let mut text = source.to_owned();
    loop {
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(toml::Deserializer::new(&text)) {
            Ok(raw) => return (Some(raw), problems),
            Err(error) => error,
        };
        let mut path = key_path_of(error.path());
        let inner = error.into_inner();
        let message = with_suggestion(inner.message().trim());
        if let Some(field) = unknown_field_name(&message) {
            if !path.ends_with_key(field) {
                path = path.key(field);
            }
        }
        let first = problems.is_empty();
        let line = map.line_of_path(&path).or_else(|| {
            first
                .then(|| inner.span().map(|span| map.line_of(span.start)))
                .flatten()
        });
        problems.push(Problem {
            line,
            key_path: path.to_string(),
            message,
        });
        match locate::remove_path(&text, &path) {
            Some(rest) if problems.len() < MAX_PROBLEMS => text = rest,
            _ => return (None, problems),
        }
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or variant), with the closest
/// expected name first when one is close: "did you mean `a`?".
fn with_suggestion(message: &str) -> String {
    let Some((unknown, expected)) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
        .and_then(|rest| rest.split_once('`'))
    else {
        return message.to_owned();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match closest(unknown, candidates.iter().copied()) {
        Some(best) => format!("{message}; did you mean `{best}`?"),
        None => message.to_owned(),
    }
}

/// The candidate most like `wanted`, if any is close enough to be a typo of it.
pub(super) fn closest<'c>(wanted: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .map(|candidate| (strsim::jaro_winkler(wanted, candidate), candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// "; did you mean `x`?" (when one is close) and the names that exist.
fn suggest(wanted: &str, defined: &[&str]) -> String {
    let hint = closest(wanted, defined.iter().copied())
        .map(|best| format!("; did you mean `{best}`?"))
        .unwrap_or_default();
    if defined.is_empty() {
        format!("{hint} (none are defined)")
    } else {
        format!("{hint} (defined: {})", defined.join(", "))
    }
}

fn key_path_of(path: &serde_path_to_error::Path) -> KeyPath {
    let mut key_path = KeyPath::root();
    for segment in path.iter() {
        key_path = match segment {
            serde_path_to_error::Segment::Seq { index } => key_path.index(*index),
            serde_path_to_error::Segment::Map { key } => key_path.key(key),
            serde_path_to_error::Segment::Enum { variant } => key_path.key(variant),
            serde_path_to_error::Segment::Unknown => key_path,
        };
    }
    key_path
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

struct Validator {
    map: SourceMap,
    /// `[identities]`, parsed (`None`: it has problems of its own).
    identities: BTreeMap<String, Option<Arc<ClientIdentity>>>,
    /// The digest of every file read so far, for the config's version.
    read: Sha256,
    files: Vec<PathBuf>,
    problems: Vec<Problem>,
    /// Key paths removed for shape problems: what follows from their absence is not reported.
    removed: Vec<String>,
    /// The config file's directory: relative file paths in it are relative to it.
    base_dir: PathBuf,
    /// Whether `[cache.shared]` is configured: a fleet shares keys it would otherwise make.
    shared_cache: bool,
    /// What is valid but cannot be honoured as it reads (`check` prints these; `run` logs them).
    warnings: Vec<Problem>,
}

impl Validator {
    /// Something valid that will not do quite what it says.
    fn warning(&mut self, path: &KeyPath, message: impl Into<String>) {
        self.warnings.push(Problem {
            line: self.map.line_of_path(path),
            key_path: path.to_string(),
            message: message.into(),
        });
    }

    fn problem(&mut self, path: &KeyPath, message: impl Into<String>) {
        let key_path = path.to_string();
        let follows_from_a_removal = self.removed.iter().any(|removed| {
            removed == &key_path
                || removed
                    .strip_prefix(key_path.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        });
        if follows_from_a_removal && !key_path.is_empty() {
            return;
        }
        let problem = Problem {
            line: self.map.line_of_path(path),
            key_path,
            message: message.into(),
        };
        // Credentials of one provider can share its problem: it is reported once.
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }
}
