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

/// The `google.protobuf.Timestamp` of Unix microseconds (how the store keeps
/// times, `anumate_store::now_micros`): the one conversion every service uses.
/// Times before 1970 keep non-negative nanos, as the type requires.
pub fn timestamp_from_micros(micros: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        // rem_euclid is in 0..1_000_000, so the nanos fit an i32.
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

#[cfg(test)]
mod timestamp_tests {
    use super::timestamp_from_micros;

    #[test]
    fn micros_to_timestamp() {
        let t = timestamp_from_micros(1_700_000_000_123_456);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_000));
        let before = timestamp_from_micros(-1);
        assert_eq!((before.seconds, before.nanos), (-1, 999_999_000));
        let zero = timestamp_from_micros(0);
        assert_eq!((zero.seconds, zero.nanos), (0, 0));
    }
}
