//! Worker identity on the wire: the role a worker plays in disaggregated serving, and the body a worker
//! registers itself with (`POST /v1/workers`, pdx's router registration API; `pdx mock --register` sends it).

/// Role of the worker in disaggregated serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode in one worker.
    Aggregated,
    /// Prefill worker: keeps KV for remote decode (`do_remote_decode`).
    Prefill,
    /// Decode worker: reads KV from a prefill worker (`do_remote_prefill`).
    Decode,
}

impl Role {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Aggregated => "aggregated",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// The registration body of `POST /v1/workers` (JSON `{"role","pool","url","model"}`, optionally
/// `"api_key"`), also sent as the heartbeat.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    /// `aggregated`, `prefill` or `decode`.
    pub role: String,
    /// Pool name (default: the role).
    pub pool: String,
    /// Worker base URL.
    pub url: String,
    /// Served model name.
    pub model: String,
    /// Key the router sends upstream as `Authorization: Bearer KEY` when the worker was started with
    /// `--api-key` (vLLM, SGLang); absent: the router forwards the client's `Authorization`. It crosses the
    /// network in clear text like the registration itself, so register over a trusted network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl std::fmt::Debug for Registration {
    /// Like the derived form, with the API key left out (registrations are logged).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("role", &self.role)
            .field("pool", &self.pool)
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_api_key_is_optional_and_never_printed() {
        let r: Registration =
            serde_json::from_str(r#"{"role":"prefill","pool":"p","url":"http://h:1","model":"m"}"#)
                .unwrap();
        assert_eq!(r.api_key, None);
        assert!(!serde_json::to_string(&r).unwrap().contains("api_key"));
        let r: Registration = serde_json::from_str(
            r#"{"role":"prefill","pool":"p","url":"http://h:1","model":"m","api_key":"sk-secret"}"#,
        )
        .unwrap();
        assert_eq!(r.api_key.as_deref(), Some("sk-secret"));
        let dbg = format!("{r:?}");
        assert!(
            !dbg.contains("sk-secret") && dbg.contains("redacted"),
            "{dbg}"
        );
    }
}
