//! Tokens: provider dialects as data, fetching, the lifetime policy and the per-credential cache.

pub mod cache;
pub mod dialect;
pub mod error;
pub mod fetch;
pub mod jwt;
pub mod lifetime;
