//! Stage 7, reserve: an idempotent retry of a call already charged is let through free
//! (Stripe answers it with its first answer and does not act again); the key is checked
//! again (the body read and the lookups may have taken a while); the cost is reserved
//! against the key's daily cap, atomically (`spend`). Nothing is sent when this fails.

use super::ctx::{Ctx, Metering};
use super::deny::Denial;
use super::idempotency::{self, Admission};
use super::service::KeybrakeProxy;
use super::spend::{SpendError, Spender};
use super::verify::VerifiedKey;
use crate::config::MeterRule;
use crate::money::Micros;
use crate::secret::Secret;
use crate::token::now_secs;
use pingora::http::RequestHeader;

/// The spend account of a key.
pub fn spender(key: &VerifiedKey) -> Spender<'_> {
    Spender {
        key_id: &key.claims.jti,
        tenant_id: &key.claims.ten,
        vendor: &key.claims.ven,
        cap: Micros(key.claims.cap),
        exp: key.claims.exp,
    }
}

/// The denial for a reservation refused.
pub fn refused(e: SpendError) -> Denial {
    match e {
        SpendError::CapExhausted => Denial::CapExhausted,
        SpendError::LedgerUnavailable => Denial::LedgerUnavailable,
        SpendError::Revoked => Denial::KeyRevoked,
    }
}

impl KeybrakeProxy {
    /// Reserves `cost` for the call `ctx` describes (its metering set by pricing), sent
    /// with `secret`.
    pub(super) async fn reserve(
        &self,
        req: &RequestHeader,
        ctx: &mut Ctx,
        key: &VerifiedKey,
        secret: &Secret,
        mut cost: Micros,
        now: i64,
    ) -> Result<(), Denial> {
        let spender = spender(key);
        if let Metering::Response { credit, .. } = &ctx.metering {
            if credit.is_positive() && cost == Micros::ZERO && self.spend.is_over_cap(&spender, now)
            {
                // An object the key already paid for (its own intent): allowed at the cap
                // unless a charge already went past it today.
                return Err(Denial::CapExhausted);
            }
        }
        if cost.is_positive() || ctx.metering.is_response() {
            // Two keys: the vendor may read (or join) either, so which one a replay would
            // be free under cannot be known.
            if req.headers.get_all("idempotency-key").iter().count() > 1 {
                return Err(Denial::InvalidAmount);
            }
            if let Some(call) = self.idempotent_call(req, ctx, key, secret) {
                let admitted = self.idempotency.admit(call, now, self.idempotent_wait);
                match Box::pin(admitted).await {
                    Admission::Replay => {
                        cost = Micros::ZERO;
                        ctx.metering = Metering::Fixed;
                    }
                    Admission::First(pending) => ctx.idempotent = Some(pending),
                    Admission::Untracked => {}
                }
            }
        }
        // A key revoked or expired meanwhile sends nothing (checked again after the
        // reservation, which may wait).
        self.still_valid(key)?;
        let reservation = self
            .spend
            .reserve(&spender, cost, now)
            .await
            .map_err(refused)?;
        ctx.spend = reservation.amount;
        ctx.reservation = Some(reservation);
        self.still_valid(key)
    }

    /// The call as the idempotency book tells it from others, when it carries one
    /// `Idempotency-Key`; it is sent with `secret`.
    fn idempotent_call<'a>(
        &self,
        req: &'a RequestHeader,
        ctx: &Ctx,
        key: &'a VerifiedKey,
        secret: &Secret,
    ) -> Option<idempotency::Call<'a>> {
        let idempotency_key = req.headers.get("idempotency-key")?.to_str().ok()?;
        let body = ctx.body.read().map(|b| &b[..]).unwrap_or_default();
        // The account is part of the request: the same key and body on another connected
        // account is another charge (at most one account header, `scope`). So is the
        // header that names it: whether the vendor keeps idempotency keys apart for
        // `Stripe-Account` and `Stripe-Context` is not known, so the same account under
        // the other header is charged again (more, never less).
        let account: Vec<u8> = ctx
            .vendor
            .iter()
            .flat_map(|v| v.account_headers.iter())
            .find_map(|h| {
                let v = req.headers.get(h)?;
                Some([h.as_str().as_bytes(), b":", v.as_bytes()].concat())
            })
            .unwrap_or_default();
        Some(idempotency::Call {
            jti: &key.jti,
            ten: &key.ten,
            exp: key.claims.exp,
            idempotency_key,
            credential: self.idempotency.credential_id(secret.expose()),
            fingerprint: self.idempotency.fingerprint(
                req.method.as_str(),
                ctx.path(),
                &account,
                body,
            ),
        })
    }

    /// Before the vendor is made to read an object to price a call (`price::Lookups`: a
    /// subscription's prices, the intent or invoice a confirm, capture or pay acts on): a
    /// key with nothing left is refused here, so a call that is then denied never has the
    /// vendor serve requests carrying the tenant's credential (SPEC §4), however many
    /// objects it names. Not for the key's own object, already paid for (confirming it
    /// costs nothing more, at the cap too), nor for a retry of a call charged (let
    /// through free) or still in flight (`reserve` has it wait for the first).
    pub(super) async fn room_before_lookups(
        &self,
        req: &RequestHeader,
        ctx: &Ctx,
        key: &VerifiedKey,
        secret: &Secret,
        rule: &MeterRule,
        now: i64,
    ) -> Result<(), Denial> {
        if rule.skip_if_created_by_same_key
            && self
                .charges
                .charged_for(rule, ctx.path(), &key.claims.jti)
                .is_some()
        {
            return Ok(());
        }
        if req.headers.get_all("idempotency-key").iter().count() == 1
            && self
                .idempotent_call(req, ctx, key, secret)
                .is_some_and(|call| self.idempotency.is_retry(&call, now))
        {
            return Ok(());
        }
        self.spend
            .has_room(&spender(key), now)
            .await
            .map_err(refused)
    }

    /// The key's expiry and revocation, and (on an edge node) the freshness of the view
    /// they are read from, checked again right before forwarding: a body read, a lease or
    /// a write-ahead may have taken seconds since admission.
    pub(super) fn still_valid(&self, key: &VerifiedKey) -> Result<(), Denial> {
        if self.staleness.is_stale() {
            return Err(Denial::ControlUnreachable);
        }
        if key.claims.exp <= now_secs() {
            return Err(Denial::KeyExpired);
        }
        if self
            .published
            .revocations
            .load()
            .is_revoked_hashed(&key.claims.jti, key.revocation_hash)
        {
            return Err(Denial::KeyRevoked);
        }
        Ok(())
    }
}
