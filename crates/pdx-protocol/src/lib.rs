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
//! * [`sse`]: server-sent-event framing (`data: ...\n\n`, `data: [DONE]\n\n`).
//! * [`worker`]: worker roles and the registration body.
//! * [`validate`]: the request checks vLLM runs before scheduling (`max_tokens ≥ 1`, sampling ranges and
//!   types, `stream_options` only with `stream`), for a router to answer 400 before any worker is touched.
//!
//! This crate does no I/O.
#![forbid(unsafe_code)]

pub mod error;
pub mod kv;
pub mod openai;
pub mod sse;
pub mod validate;
pub mod worker;

pub use error::{ApiError, ErrorBody, ErrorResponse};
pub use kv::{BootstrapParams, KvTransferParams};
pub use openai::*;
pub use worker::{parse_registration, Registration, Role};
