//! Disaggregated prefill/decode handshake fields carried inside completion requests/responses.
//!
//! Source: vLLM `vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py`
//! (`NixlConnectorScheduler.request_finished` builds the prefill response's params,
//! `get_num_new_matched_tokens` / `update_state_after_alloc` consume them on decode), and
//! SGLang's PD router (`bootstrap_host`, `bootstrap_port`, `bootstrap_room` injected into
//! the body sent to both workers).

use serde::{Deserialize, Serialize};

/// vLLM NixlConnector `kv_transfer_params`.
///
/// Two shapes travel in practice:
/// * router → prefill: `{"do_remote_decode": true, "do_remote_prefill": false, ...nulls}`
///   (with `max_tokens = 1`);
/// * prefill → router → decode: what the prefill engine returns from `request_finished`,
///   `{"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id": ...,
///   "remote_block_ids": [...], "remote_host": ..., "remote_port": ...,
///   "remote_request_id": ..., "tp_size": 1}`.
///
/// Absent fields deserialize as `false`/`None`; unknown fields are kept in `extra` so newer
/// vLLM fields survive a round trip through the router.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvTransferParams {
    /// Set by the router on the prefill request: keep the KV for a remote decode engine.
    #[serde(default)]
    pub do_remote_decode: bool,
    /// Set on the decode request: the prompt's KV is to be read from the remote (prefill) engine.
    #[serde(default)]
    pub do_remote_prefill: bool,
    /// Prefill engine id (NIXL agent name) that holds the blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_engine_id: Option<String>,
    /// Block ids (indices into the prefill engine's KV block pool) holding the prompt's KV,
    /// in prompt order; block `i` holds tokens `[i*block_size, (i+1)*block_size)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_block_ids: Option<Vec<u32>>,
    /// Host of the prefill engine's metadata side channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// Port of the prefill engine's metadata side channel (NIXL side-channel port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    /// Request id on the prefill engine; sent back in the read-completion notification so
    /// the prefill engine frees the blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_request_id: Option<String>,
    /// Tensor-parallel size of the prefill engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_size: Option<u32>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl KvTransferParams {
    /// The params a router sends to a prefill engine (vLLM's `toy_proxy_server.py` shape).
    pub fn for_prefill() -> Self {
        Self {
            do_remote_decode: true,
            ..Self::default()
        }
    }
}

/// SGLang PD-router bootstrap fields (added to the same body sent to prefill and decode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootstrapParams {
    /// Host of the prefill worker's bootstrap server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_host: Option<String>,
    /// Port of the prefill worker's bootstrap server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_port: Option<u16>,
    /// Random room id pairing the prefill and decode halves of one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_room: Option<u64>,
}

impl BootstrapParams {
    /// True when the request came through SGLang's PD router.
    pub fn is_set(&self) -> bool {
        self.bootstrap_room.is_some() || self.bootstrap_host.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_prefill_response_params_and_keeps_unknown_fields() {
        let j = r#"{"do_remote_prefill":true,"do_remote_decode":false,"remote_engine_id":"e1",
            "remote_block_ids":[3,4,9],"remote_host":"10.0.0.1","remote_port":5600,
            "remote_request_id":"cmpl-1","tp_size":1,"future_field":{"a":1}}"#;
        let p: KvTransferParams = serde_json::from_str(j).unwrap();
        assert!(p.do_remote_prefill && !p.do_remote_decode);
        assert_eq!(p.remote_block_ids.as_deref(), Some(&[3, 4, 9][..]));
        assert_eq!(p.remote_port, Some(5600));
        assert_eq!(p.extra["future_field"]["a"], 1);
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["future_field"]["a"], 1);
        assert_eq!(back["remote_engine_id"], "e1");
    }

    #[test]
    fn router_prefill_shape_with_nulls() {
        let j = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,
            "remote_block_ids":null,"remote_host":null,"remote_port":null}"#;
        let p: KvTransferParams = serde_json::from_str(j).unwrap();
        assert_eq!(p, KvTransferParams::for_prefill());
    }
}
