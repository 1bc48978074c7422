//! Authentication on the OpenAI front (`--api-key`) and the `Authorization` the router sends upstream.
//!
//! Clients: with keys configured, the OpenAI routes (every `/v1/...` path but the registration API
//! `/v1/workers`, which has its own token) need `Authorization: Bearer KEY` with one of the keys, as vLLM's
//! `--api-key` (`AuthenticationMiddleware` in `vllm/entrypoints/openai/server_utils.py`); `/health`, `/ready`
//! and `/metrics` stay open. A missing or wrong key is a 401 OpenAI error (`AuthenticationError`, what the
//! `openai` SDK raises for a 401) with `WWW-Authenticate: Bearer`. The comparison takes the same time
//! whatever the bytes of the key sent, and tries every configured key.
//!
//! Upstream: engines started with `--api-key` (vLLM, SGLang) answer 401 to a request without it. The router
//! sends the worker's own key (`api_key` of the worker or its pool in the file, or of its registration) when
//! one is configured, and otherwise the client's `Authorization` header as it came, to the prefill and the
//! decode worker alike.

use crate::registry::Worker;
use crate::RouterError;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use pdx_protocol::ApiError;

/// Longest API key accepted, bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Most client keys accepted (flags and file together).
pub const MAX_KEYS: usize = 64;

/// An API key: its `Debug` form never shows it (configurations and workers are debug-printed).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl From<&str> for ApiKey {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// Serde helper for the file's `api_key`: one string or a list of strings.
pub(crate) fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ApiKey>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(ApiKey),
        Many(Vec<ApiKey>),
    }
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Checks that `key` can travel in an `Authorization: Bearer` header: 1 to [`MAX_KEY_BYTES`] bytes of
/// visible ASCII (RFC 6750's `b64token` is narrower; engines accept any visible character).
///
/// Errors: [`RouterError::Config`] naming `what` (never the key itself).
pub fn check_key(key: &str, what: &str) -> Result<(), RouterError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RouterError::Config(format!(
            "{what}: an API key is 1 to {MAX_KEY_BYTES} visible ASCII characters, no spaces"
        )));
    }
    Ok(())
}

/// The client keys: `--api-key` flags and the file's `api_key`, checked, duplicates dropped.
///
/// Errors: [`RouterError::Config`] for a key [`check_key`] refuses, or more than [`MAX_KEYS`].
pub fn client_keys(flags: &[ApiKey], file: &[ApiKey]) -> Result<Vec<ApiKey>, RouterError> {
    let mut out: Vec<ApiKey> = Vec::new();
    for k in flags.iter().chain(file) {
        check_key(k.expose(), "api_key")?;
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    if out.len() > MAX_KEYS {
        return Err(RouterError::Config(format!(
            "at most {MAX_KEYS} API keys, got {}",
            out.len()
        )));
    }
    Ok(out)
}

/// Whether `path` is an OpenAI route that `--api-key` guards: every `/v1` path (unknown ones too, so a 404
/// tells nothing to a client without a key) except the admin API (registration, the planner's diversions),
/// which has its own token.
pub fn guards(path: &str) -> bool {
    (path == "/v1" || path.starts_with("/v1/"))
        && path != "/v1/workers"
        && path != "/v1/planner/diversions"
}

/// Checks the client's `Authorization` against `keys` (none: everyone passes).
///
/// Errors: the 401 [`ApiError`] for a missing, malformed or unknown key.
pub fn authorize(keys: &[ApiKey], headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let token = headers.get(AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        let sp = v.iter().position(|&b| b == b' ')?;
        v[..sp]
            .eq_ignore_ascii_case(b"bearer")
            .then(|| &v[sp + 1..])
    });
    let ok = token.is_some_and(|t| {
        // Every key is compared, whatever matched before.
        keys.iter()
            .fold(false, |acc, k| acc | ct_eq(t, k.expose().as_bytes()))
    });
    if ok {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

/// The 401 answer.
pub fn unauthorized() -> ApiError {
    ApiError::new(
        401,
        "AuthenticationError",
        "missing or invalid API key: send `Authorization: Bearer <key>`",
    )
}

/// `given == key`, in time that depends on the length of `key` only: every byte of `key` is compared
/// (against `given` cycled), and the lengths are folded in at the end, with no early exit.
fn ct_eq(given: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != key.len());
    let n = given.len().max(1);
    for (i, &k) in key.iter().enumerate() {
        let g = given.get(i % n).copied().unwrap_or(0);
        diff |= std::hint::black_box(g ^ k);
    }
    std::hint::black_box(diff) == 0
}

/// `Bearer KEY` as a header value marked sensitive (left out of debug output), for an upstream key.
///
/// Errors: [`RouterError::Config`] for a key [`check_key`] refuses.
pub fn bearer(key: Option<&str>, what: &str) -> Result<Option<HeaderValue>, RouterError> {
    let Some(key) = key else {
        return Ok(None);
    };
    check_key(key, what)?;
    let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| RouterError::Config(format!("{what}: API key is not a header value")))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// The `Authorization` to send to `w`: its own key if it has one, else the client's header.
pub fn upstream<'a>(w: &'a Worker, client: Option<&'a HeaderValue>) -> Option<&'a HeaderValue> {
    w.upstream_auth.as_ref().or(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&[u8]>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_bytes(a).unwrap());
        }
        h
    }

    #[test]
    fn constant_time_compare_is_equality() {
        for (a, b) in [
            (&b"sk-1"[..], &b"sk-1"[..]),
            (b"", b""),
            (b"sk-1", b"sk-2"),
            (b"sk-", b"sk-1"),
            (b"sk-1sk-1", b"sk-1"),
            (b"", b"k"),
            (b"k", b""),
            (b"abab", b"ab"),
            (b"ab", b"abab"),
        ] {
            assert_eq!(ct_eq(a, b), a == b, "{a:?} {b:?}");
        }
    }

    #[test]
    fn bearer_keys_are_checked() {
        let keys: Vec<ApiKey> = vec!["sk-a".into(), "sk-b".into()];
        assert!(authorize(&[], &headers(None)).is_ok());
        for ok in [
            &b"Bearer sk-a"[..],
            b"Bearer sk-b",
            b"bearer sk-a",
            b"BEARER sk-b",
        ] {
            assert!(authorize(&keys, &headers(Some(ok))).is_ok(), "{ok:?}");
        }
        for bad in [
            None,
            Some(&b"Bearer sk-c"[..]),
            Some(b"Bearer sk-a "),
            Some(b"Bearer  sk-a"),
            Some(b"Basic sk-a"),
            Some(b"sk-a"),
            Some(b"Bearer"),
            Some(b"Bearer "),
            Some(b"Bearer sk-\xff"),
        ] {
            let e = authorize(&keys, &headers(bad)).unwrap_err();
            assert_eq!((e.status, e.kind), (401, "AuthenticationError"), "{bad:?}");
        }
    }

    #[test]
    fn guarded_paths() {
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/v1/models/a/b",
            "/v1/x",
            "/v1",
        ] {
            assert!(guards(p), "{p}");
        }
        for p in [
            "/v1/workers",
            "/v1/planner/diversions",
            "/health",
            "/ready",
            "/metrics",
            "/v10",
            "/",
        ] {
            assert!(!guards(p), "{p}");
        }
    }

    #[test]
    fn keys_from_flags_and_file() {
        let s = |v: &[&str]| v.iter().map(|&x| ApiKey::from(x)).collect::<Vec<_>>();
        assert_eq!(
            client_keys(&s(&["a", "b"]), &s(&["b", "c"])).unwrap(),
            s(&["a", "b", "c"])
        );
        for bad in [
            "",
            "has space",
            "tab\tkey",
            "clé",
            &"k".repeat(MAX_KEY_BYTES + 1),
        ] {
            let e = client_keys(&s(&[bad]), &[]).unwrap_err().to_string();
            // The error never repeats the key.
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let many: Vec<ApiKey> = (0..MAX_KEYS)
            .map(|i| ApiKey::from(i.to_string().as_str()))
            .collect();
        assert!(client_keys(&s(&["k"]), &many).is_err());
        assert_eq!(format!("{:?}", s(&["sk-secret"])), "[ApiKey(<redacted>)]");
        let v = bearer(Some("sk-up"), "pool p").unwrap().unwrap();
        assert_eq!(v.as_bytes(), b"Bearer sk-up");
        assert!(v.is_sensitive());
        assert!(format!("{v:?}").contains("Sensitive"));
        assert!(bearer(Some("a b"), "pool p").is_err());
        assert!(bearer(None, "pool p").unwrap().is_none());
    }
}
