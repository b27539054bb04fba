//! The approvals service (SPEC §7).
#![forbid(unsafe_code)]

pub mod notify;
pub mod rules;
