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

/// The registration body of `POST /v1/workers` (JSON `{"role","pool","url","model"}`), also sent as the
/// heartbeat.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    /// `aggregated`, `prefill` or `decode`.
    pub role: String,
    /// Pool name (default: the role).
    pub pool: String,
    /// Worker base URL.
    pub url: String,
    /// Served model name.
    pub model: String,
}
