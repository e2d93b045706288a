//! Tokens: provider dialects as data, fetching from the endpoint, the seam to any other source
//! of tokens, the lifetime policy and the cache keyed by credential identity.

pub mod assertion;
pub mod budget;
pub mod cache;
pub mod dialect;
pub mod dpop;
pub mod error;
pub mod fetch;
pub mod jwt;
pub mod lifetime;
pub mod shared;
pub mod source;
pub mod spec;
