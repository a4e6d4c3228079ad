//! The data plane (SPEC §4, §5, in-process half of §6): a Pingora proxy that admits a
//! request only with a valid, unrevoked vault key allowed for the vendor, endpoint and
//! account, within its daily cap, and forwards it with the vendor's real credential.
//!
//! One module per stage, in request order (`service` wires them into Pingora, `ctx` is
//! what a request carries between them):
//!  0. edge nodes only: `fresh` (refuse everything while the node is stale);
//!  1. route: `path` (the canonical path names the vendor);
//!  2. authenticate: `extract` (the vault key), `verify`;
//!  3. scope: `scope`;
//!  4. credential: `inject::credential`;
//!  5. plan the body: `body_plan` (and `body_read`, which reads it whole);
//!  6. price: `price` with `meter`, the vendor look-ups of `upstream_call`, the per-object
//!     `charges` memory; `llm` plans and prices token-metered calls;
//!  7. reserve: `reserve` with `idempotency` and `spend` (its ledger calls batched by
//!     `lease_batch`, each reservation committed before forwarding by `write_ahead`);
//!  8. inject: `inject` (the request the vendor sees);
//!  9. forward: Pingora with `upstream`, or `forward` for a large read body;
//! 10. settle: `settle`, and `response_charge` for what the answer charges;
//! 11. record: `record` and `audit`.
//!
//! `deny` turns any refusal into the spec's response. The proxy reads only what `sync`
//! publishes and never touches storage.

pub mod audit;
mod batch_queue;
pub mod body_plan;
pub mod body_read;
pub mod charges;
pub mod ctx;
pub mod deny;
pub mod extract;
pub mod forward;
pub mod fresh;
#[cfg(test)]
mod hook_tests;
pub mod idempotency;
pub mod inject;
pub mod lease_batch;
pub mod llm;
pub mod meter;
pub mod path;
pub mod price;
pub mod record;
pub mod reserve;
pub mod response_charge;
pub mod scope;
pub mod service;
pub mod settle;
pub mod spend;
mod tenant_shares;
pub mod upstream;
pub mod upstream_call;
pub mod verify;
pub mod write_ahead;
