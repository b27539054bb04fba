//! Anumate's contracts, generated from `proto/` by `build.rs`.
//!
//! Every message, enum, gRPC server trait and client lives here under its proto
//! package path (`anumate::registry::v1::…`). Messages also implement serde with
//! the proto3 JSON mapping (pbjson).
#![forbid(unsafe_code)]
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The encoded `FileDescriptorSet` of every Anumate proto and its imports,
/// including extension options (`google.api.http`, CloudEvents types). Used by
/// gRPC reflection and the REST gateway.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/anumate_descriptor.bin"));

pub mod event_types;

macro_rules! package {
    ($file:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $file, ".rs"));
        include!(concat!(env!("OUT_DIR"), "/", $file, ".serde.rs"));
    };
}

/// `google.api` (HTTP annotations).
pub mod google {
    pub mod api {
        package!("google.api");
    }
}

/// `anumate.*` packages.
pub mod anumate {
    pub mod approvals {
        pub mod v1 {
            package!("anumate.approvals.v1");
        }
    }
    pub mod captokens {
        pub mod v1 {
            package!("anumate.captokens.v1");
        }
    }
    pub mod common {
        pub mod v1 {
            package!("anumate.common.v1");
        }
    }
    pub mod compiler {
        pub mod v1 {
            package!("anumate.compiler.v1");
        }
    }
    pub mod connectors {
        pub mod v1 {
            package!("anumate.connectors.v1");
        }
    }
    pub mod events {
        pub mod v1 {
            package!("anumate.events.v1");
        }
    }
    pub mod ghostrun {
        pub mod v1 {
            package!("anumate.ghostrun.v1");
        }
    }
    pub mod orchestrator {
        pub mod v1 {
            package!("anumate.orchestrator.v1");
        }
    }
    pub mod policy {
        pub mod v1 {
            package!("anumate.policy.v1");
        }
    }
    pub mod receipts {
        pub mod v1 {
            package!("anumate.receipts.v1");
        }
    }
    pub mod registry {
        pub mod v1 {
            package!("anumate.registry.v1");
        }
    }
}

pub use anumate::*;

/// Unix microseconds, `Timestamp` and RFC 3339 text, converted one way everywhere.
mod timestamp;

pub use timestamp::{
    TimestampError, micros_from_rfc3339, micros_from_timestamp, micros_from_timestamp_saturating,
    rfc3339_from_micros, rfc3339_from_timestamp, timestamp_from_micros, timestamp_from_secs,
};
