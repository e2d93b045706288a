//! Validation of single values every table uses: URLs, durations, secrets and the files they
//! are read from.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bounds for durations: no timeout or back-off here means anything past them.
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);
/// Token lifetimes run to a year (and a day for leap years).
pub(super) const YEAR: Duration = Duration::from_secs(366 * 86_400);

use sha2::{Digest, Sha256};

use crate::config::raw::RawSecret;
use crate::config::validate::Validator;
use crate::config::KeyPath;
use crate::secret::{Secret, SecretSource};

impl Validator {
    /// A URL that must be present; `https` unless `allow_plaintext`.
    pub(super) fn required_url(
        &mut self,
        path: &KeyPath,
        text: Option<&str>,
        allow_plaintext: bool,
        is_base: bool,
    ) -> Option<reqwest::Url> {
        let Some(text) = text else {
            self.problem(path, "missing");
            return None;
        };
        let url = match reqwest::Url::parse(text) {
            Ok(url) if url.host_str().is_some() => url,
            Ok(_) | Err(_) => {
                self.problem(path, format!("`{text}` is not an absolute http(s) URL"));
                return None;
            }
        };
        match url.scheme() {
            "https" => {}
            "http" if allow_plaintext => {}
            "http" => {
                self.problem(
                    path,
                    "http:// would send tokens and secrets in clear text; use https:// \
                     (or allow_plaintext = true on this table for a local test server)",
                );
                return None;
            }
            other => {
                self.problem(path, format!("scheme `{other}` is not http or https"));
                return None;
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(
                path,
                "credentials in the URL are not allowed; use the secret keys",
            );
            return None;
        }
        if is_base && url.query().is_some() {
            self.problem(path, "must not carry a query");
            return None;
        }
        Some(url)
    }

    /// A duration that is not zero and at most `max` (a deadline past it means nothing, and
    /// could not be added to a clock): `default` when absent or wrong.
    pub(super) fn nonzero(
        &mut self,
        path: &KeyPath,
        value: Option<Duration>,
        default: Duration,
        max: Duration,
    ) -> Duration {
        match value {
            Some(d) if d.is_zero() => {
                self.problem(path, "must not be zero");
                default
            }
            Some(d) => self.at_most(path, d, max).unwrap_or(default),
            None => default,
        }
    }

    /// `value` if it is at most `max`; else a problem naming the bound.
    pub(super) fn at_most(&mut self, path: &KeyPath, value: Duration, max: Duration) -> Option<Duration> {
        if value <= max {
            return Some(value);
        }
        self.problem(
            path,
            format!("must be at most {}", humantime::format_duration(max)),
        );
        None
    }

    /// A secret that is read again when it is needed (a file), checked readable now.
    pub(super) fn secret_source(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<SecretSource> {
        let value = self.secret(path, raw)?;
        Some(match raw {
            RawSecret::File(file) => SecretSource::File(self.resolve(file)),
            RawSecret::Literal(_) | RawSecret::Env(_) => SecretSource::Fixed(value),
        })
    }

    pub(super) fn secret(&mut self, path: &KeyPath, raw: &RawSecret) -> Option<Secret> {
        self.reference(path, raw, "secret").map(Secret::new)
    }

    /// A value that may be written in place or come from `{ env }` / `{ file }`, as secrets
    /// may (a client id, an organisation): not secret, but often kept beside one.
    pub(super) fn text(&mut self, path: &KeyPath, raw: Option<&RawSecret>) -> Option<String> {
        self.reference(path, raw?, "value")
    }

    pub(super) fn reference(&mut self, path: &KeyPath, raw: &RawSecret, what: &str) -> Option<String> {
        let value = match raw {
            RawSecret::Literal(value) => value.clone(),
            RawSecret::Env(name) => match std::env::var(name) {
                Ok(value) => value,
                Err(_) => {
                    self.problem(path, format!("environment variable {name} is not set"));
                    return None;
                }
            },
            RawSecret::File(file) => match self.read_file(&self.resolve(file)).and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8 text"))
            }) {
                Ok(contents) => contents.trim_end_matches(['\n', '\r']).to_owned(),
                Err(err) => {
                    self.problem(path, format!("cannot read {what} file {}: {err}", file.display()));
                    return None;
                }
            },
        };
        if value.is_empty() {
            self.problem(path, format!("the {what} is empty"));
            return None;
        }
        Some(value)
    }

    /// Reads a file the config names, noting it (for reload) and its content (for the version).
    pub(super) fn read_file(&mut self, file: &Path) -> std::io::Result<Vec<u8>> {
        self.files.push(file.to_owned());
        let bytes = std::fs::read(file)?;
        self.read.update(Sha256::digest(&bytes));
        Ok(bytes)
    }

    /// A path from the config file: relative ones are relative to the file's directory.
    pub(super) fn resolve(&self, file: &Path) -> PathBuf {
        if file.is_relative() {
            self.base_dir.join(file)
        } else {
            file.to_owned()
        }
    }
}
