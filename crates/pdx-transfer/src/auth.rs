//! The agent protocol's optional shared secret: a mutual challenge–response at the start of every connection.
//!
//! When an agent has a secret ([`crate::AgentConfig::secret`]), its listener serves nothing (no metadata, no
//! READ/WRITE, no notification, no memfd) to a connection that has not proved it holds the same secret, and an
//! agent with a secret talks only to peers that prove it in turn. Each side proves it with HMAC-SHA256 (RFC 2104,
//! FIPS 180-4) over both sides' fresh 32-byte random nonces, so a proof is never valid twice and neither side can
//! be used as an oracle for the other's proof (the two proofs carry different labels):
//!
//! ```text
//! initiator → target   AuthHello { name, instance_id, nonce_i }
//! target → initiator   Challenge { nonce_t, proof_t = HMAC(secret, "pdx-agent-auth/1 target"    ‖ nonce_i ‖ nonce_t) }
//! initiator → target   Auth      { proof_i = HMAC(secret, "pdx-agent-auth/1 initiator" ‖ nonce_i ‖ nonce_t ‖ name) }
//! target → initiator   AuthOk    (or Error, then the connection closes)
//! ```
//!
//! Proofs are compared in constant time (`hmac`'s `verify_slice`). The secret authenticates the start of a
//! connection; it neither encrypts nor integrity-protects the frames that follow (run agents on a private network
//! or through a tunnel when on-path attackers are a concern).

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Result, TransferError};

/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;
/// Shortest secret accepted, in bytes (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 1024;
/// Environment variable `pdx mock` (and [`AgentSecret::from_env`]) read the secret from.
pub const SECRET_ENV: &str = "PDX_AGENT_SECRET";

const TARGET_LABEL: &[u8] = b"pdx-agent-auth/1 target";
const INITIATOR_LABEL: &[u8] = b"pdx-agent-auth/1 initiator";

/// A shared secret for the agent protocol (16..=1024 bytes; 32 random bytes is a good choice). Every agent that
/// should talk to the others gets the same one. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentSecret(Arc<[u8]>);

impl std::fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentSecret(<redacted>)")
    }
}

impl AgentSecret {
    /// A secret from its bytes. Errors: [`TransferError::Invalid`] when shorter than [`MIN_SECRET_BYTES`] or
    /// longer than [`MAX_SECRET_BYTES`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<AgentSecret> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES || bytes.len() > MAX_SECRET_BYTES {
            return Err(TransferError::Invalid(format!(
                "an agent secret must be {MIN_SECRET_BYTES}..={MAX_SECRET_BYTES} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(AgentSecret(bytes.into()))
    }

    /// The secret in [`SECRET_ENV`] (`PDX_AGENT_SECRET`), if set and not empty. Errors as [`AgentSecret::new`].
    pub fn from_env() -> Result<Option<AgentSecret>> {
        match std::env::var_os(SECRET_ENV) {
            Some(v) if !v.is_empty() => {
                AgentSecret::new(std::os::unix::ffi::OsStringExt::into_vec(v)).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes keys of any length (RFC 2104 §2), so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(label);
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// The target's proof over both nonces.
    pub(crate) fn target_proof(
        &self,
        nonce_i: &[u8; NONCE_LEN],
        nonce_t: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(TARGET_LABEL, &[nonce_i, nonce_t])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a target's proof, in constant time.
    pub(crate) fn verify_target(
        &self,
        nonce_i: &[u8; NONCE_LEN],
        nonce_t: &[u8; NONCE_LEN],
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(TARGET_LABEL, &[nonce_i, nonce_t])
            .verify_slice(proof)
            .is_ok()
    }

    /// The initiator's proof over both nonces and its name.
    pub(crate) fn initiator_proof(
        &self,
        nonce_i: &[u8; NONCE_LEN],
        nonce_t: &[u8; NONCE_LEN],
        name: &str,
    ) -> [u8; PROOF_LEN] {
        self.mac(INITIATOR_LABEL, &[nonce_i, nonce_t, name.as_bytes()])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks an initiator's proof, in constant time.
    pub(crate) fn verify_initiator(
        &self,
        nonce_i: &[u8; NONCE_LEN],
        nonce_t: &[u8; NONCE_LEN],
        name: &str,
        proof: &[u8; PROOF_LEN],
    ) -> bool {
        self.mac(INITIATOR_LABEL, &[nonce_i, nonce_t, name.as_bytes()])
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh random nonce from the operating system (`getrandom`). Errors: [`TransferError::Io`] when the OS has
/// no randomness to give.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| TransferError::Io {
        op: "getrandom",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_role() {
        let s = AgentSecret::new(*b"0123456789abcdef").unwrap();
        let other = AgentSecret::new(*b"0123456789abcdeX").unwrap();
        let (ni, nt) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(ni, nt);
        let pt = s.target_proof(&ni, &nt);
        assert!(s.verify_target(&ni, &nt, &pt));
        assert!(!other.verify_target(&ni, &nt, &pt));
        assert!(!s.verify_target(&nt, &ni, &pt));
        let pi = s.initiator_proof(&ni, &nt, "decode");
        assert!(s.verify_initiator(&ni, &nt, "decode", &pi));
        assert!(!s.verify_initiator(&ni, &nt, "decode2", &pi));
        // A target's proof is no initiator's proof (no reflection).
        assert!(!s.verify_initiator(&ni, &nt, "", &pt));
        assert_ne!(pt, pi);
    }

    #[test]
    fn secrets_are_bounded_and_never_printed() {
        assert!(AgentSecret::new(vec![1; MIN_SECRET_BYTES - 1]).is_err());
        assert!(AgentSecret::new(vec![1; MAX_SECRET_BYTES + 1]).is_err());
        let s = AgentSecret::new(b"super secret value!".to_vec()).unwrap();
        assert!(!format!("{s:?}").contains("super"));
    }
}
