//! # sgw: the safeguarding information-sharing gateway
//!
//! Agencies (health, police, schools, children's social care, ...) exchange concern
//! notifications and consent-bound records over gRPC with mutual TLS; every
//! disclosure is first written durably to an append-only, verifiable audit log.
//!
//! ## The life of a request
//! 1. [`tls`] accepts a TCP connection, runs the handshake in its own task and
//!    verifies the client certificate (chain, validity, clientAuth EKU, revocation).
//! 2. [`auth`] runs for every call: it maps the certificate to a registered
//!    [`identity::Caller`] (SPIFFE URI SAN + the registry in [`config`]), checks the
//!    caller's role against the service, and logs one line per call.
//! 3. [`api`] adapters translate protobuf to [`domain`] types and back; errors become
//!    `tonic::Status` in [`api::status`] only.
//!
//! ## Map
//! - [`concerns`]: concern notifications: routing, inboxes, delivery, deadlines.
//! - [`config`]: TOML to a validated, typed `Config`.
//! - [`domain`]: plain Rust, no gRPC or storage: NHS numbers, ids, policy enums.
//! - [`pki`]: development certificates (rcgen).
//! - [`records`]: consent-bound records: sharing, finding, disclosing, consent, retention.
//! - [`server`]: assembly, graceful shutdown.
//! - [`cli`]: the `sgw` command line.
#![forbid(unsafe_code)]
#![deny(unused_must_use)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod concerns;
pub mod config;
pub mod domain;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod pg;
pub mod pki;
pub mod proto;
pub mod records;
pub mod server;
pub mod store;
pub mod tls;

#[cfg(test)]
pub(crate) mod testing;
