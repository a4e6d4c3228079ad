//! The data plane (SPEC §4, §5, in-process half of §6): a Pingora proxy that admits a
//! request only with a valid, unrevoked vault key allowed for the vendor, endpoint and
//! account, within its daily cap, and forwards it with the vendor's real credential.
//!
//! One module per stage, in request order: `path` → `extract` → `verify` → `scope` →
//! `meter` (with the vendor look-ups of `upstream_call` for what a response-metered call
//! can charge; `llm` for token-metered vendors) → `idempotency` → `spend` (its ledger calls batched by `lease_batch`) → `inject` → `upstream` → (`spend` settle) →
//! `record`; `deny` turns any refusal into the spec's response; `service` wires them into
//! Pingora. The proxy reads only what `sync` publishes and never touches storage.

pub mod deny;
pub mod extract;
pub mod idempotency;
pub mod inject;
pub mod lease_batch;
pub mod llm;
pub mod meter;
pub mod path;
pub mod record;
pub mod scope;
pub mod service;
pub mod spend;
pub mod upstream;
pub mod upstream_call;
pub mod verify;
