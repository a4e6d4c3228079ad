//! Identifiers and tokens: `tn_`, `key_`, `kb_`… prefixes make each kind recognizable
//! (and findable by secret scanners); the random part comes from the OS. Vault-key ids
//! sort by creation time (milliseconds, then random bits) so inserts share the index's
//! last page; tokens are stored and looked up by their SHA-256.

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .expect("the operating system's random source failed");
    out
}

/// An identifier: prefix + 16 random bytes, base32-like lowercase alphabet.
pub fn new_id(prefix: &str) -> String {
    encode_id(prefix, random_bytes())
}

/// An identifier that sorts by creation time (like a ULID): the first 6 of its 16 bytes
/// are the Unix time in milliseconds, the other 10 (80 bits) random. Same shape as
/// `new_id`. Vault keys use it: their ids are indexed, and an index of random ids takes
/// every insert to a different page, which SQLite must then write and checkpoint; ids in
/// time order all land on the last page.
pub fn new_sorted_id(prefix: &str, unix_ms: u64) -> String {
    let mut bytes: [u8; 16] = random_bytes();
    bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    encode_id(prefix, bytes)
}

/// Base32 of `bytes` in an alphabet in ASCII order, so ids compare as their bytes do.
fn encode_id(prefix: &str, bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut out = String::with_capacity(prefix.len() + 26);
    out.push_str(prefix);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A bearer token: prefix + 32 random bytes, base64url.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = random_bytes();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Tokens are stored and looked up by their SHA-256: they carry 256 bits of entropy, so a
/// fast hash is enough, and a hash lookup leaks nothing useful about the token.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Whether `token` has the form of a control API token (a tenant's `kb_`, the admin
/// `kba_`, a node's `kbn_`), for messages that tell it from a vault key.
pub fn is_control_token(token: &str) -> bool {
    token_kind(token).is_some() && !token.starts_with("vk_")
}

/// What a bearer token looks like, by its prefix, for messages: `None` when unknown.
pub fn token_kind(token: &str) -> Option<&'static str> {
    [
        ("kba_", "the admin token (kba_…)"),
        ("kbn_", "a node token (kbn_…)"),
        ("kb_", "a tenant API token (kb_…)"),
        ("vk_", "a vault key (vk_…), which is for the proxy listener"),
    ]
    .into_iter()
    .find(|(prefix, _)| token.starts_with(prefix))
    .map(|(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = super::new_id("key_");
        let b = super::new_id("key_");
        assert!(a.starts_with("key_") && a.len() == 4 + 26);
        assert_ne!(a, b);
        assert!(super::new_token("kb_").starts_with("kb_"));
    }

    #[test]
    fn sorted_ids_follow_time_and_stay_distinct() {
        let early = super::new_sorted_id("key_", 1_700_000_000_000);
        let same_ms = super::new_sorted_id("key_", 1_700_000_000_000);
        let later = super::new_sorted_id("key_", 1_700_000_000_001);
        assert!(early.starts_with("key_") && early.len() == 4 + 26);
        assert_ne!(early, same_ms);
        assert!(early < later && same_ms < later);
        // 48 bits of milliseconds: the order holds far past any key's lifetime.
        assert!(super::new_sorted_id("k", 1 << 46) > super::new_sorted_id("k", (1 << 46) - 1));
    }
}
