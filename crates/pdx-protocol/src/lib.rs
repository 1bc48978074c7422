//! Wire types shared by pdx's router and its mock engine (`pdx mock`).
//!
//! * [`openai`]: the OpenAI-compatible subset vLLM serves (`/v1/chat/completions`,
//!   `/v1/completions`, `/v1/models`), requests and responses, streaming chunks, `usage`,
//!   `finish_reason`. Every request type keeps unknown fields in an `extra` map
//!   (`#[serde(flatten)]`) so a router can forward a body it only partly understands without
//!   losing anything.
//! * [`kv`]: vLLM NixlConnector's `kv_transfer_params` (disaggregated prefill/decode handshake)
//!   and SGLang's bootstrap fields.
//! * [`error`]: OpenAI error JSON (`{"error":{"message","type","param","code"}}`) with its HTTP
//!   status.
//! * [`sampling`]: request validation as vLLM's server does it (field types, sampling ranges, `n`, `stop`,
//!   `logprobs`, `seed`, `tools`/`tool_choice`, `response_format`), with vLLM's messages.
//! * [`sse`]: server-sent-event framing (`data: ...\n\n`, `data: [DONE]\n\n`).
//! * [`worker`]: worker roles and the registration body.
//! * [`prom`]: a strict, bounded parser of the Prometheus text format engines serve on `/metrics`.
//!
//! This crate does no I/O.
#![forbid(unsafe_code)]

pub mod error;
pub mod kv;
pub mod openai;
pub mod prom;
pub mod sampling;
pub mod sse;
pub mod worker;

pub use error::{ApiError, ErrorBody, ErrorResponse};
pub use kv::{BootstrapParams, KvTransferParams};
pub use openai::*;
pub use worker::{parse_registration, Registration, Role};
