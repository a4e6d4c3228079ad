//! Keybrake: short-lived, scoped, spend-capped vault keys for AI agents, and the Pingora
//! proxy that enforces them. See README.md for the architecture map.

pub mod cli;
pub mod config;
pub mod conns;
pub mod control;
pub mod database;
pub mod edge;
pub mod ids;
pub mod log_every;
pub mod metrics;
pub mod migrate;
pub mod money;
pub mod pattern;
pub mod proxy;
pub mod proxy_listener;
pub mod revocation;
pub mod secret;
pub mod serve;
pub mod sync;
pub mod tls;
pub mod token;

/// The hash map of the request path: aHash (fast, randomly keyed) instead of SipHash.
pub type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
