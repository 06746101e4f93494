//! abproxy: an A/B, canary and shadow traffic-splitting reverse proxy for model serving.
//!
//! The request path reads top to bottom in [`proxy::Proxy::handle`]; a config generation is
//! an immutable [`route::Generation`] swapped whole by [`reload::Reloader`].

pub mod admin;
mod alarm;
pub mod assign;
pub mod canary;
pub mod cli;
mod clock;
pub mod config;
pub mod demo;
mod detach;
pub mod grpc;
pub mod head;
pub mod http_client;
pub mod json_pointer;
pub mod metrics;
pub mod prediction;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod shadow;
pub mod tls;
pub mod upstream;
mod wire;
