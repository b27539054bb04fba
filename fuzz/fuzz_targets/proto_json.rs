//! Request messages the services accept as proto3 JSON (pbjson, through the
//! REST gateway and the CLI) and as protobuf bytes: decoding arbitrary input
//! fails cleanly, and what decodes encodes again.
#![no_main]

use anumate_proto::anumate::policy::v1::{EvaluatePolicyRequest, TestPolicyRequest};
use anumate_proto::anumate::registry::v1::{PushCapsuleRequest, ValidateCapsuleRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn both<M>(data: &[u8])
where
    M: Message + Default + serde::Serialize + serde::de::DeserializeOwned,
{
    if let Ok(m) = serde_json::from_slice::<M>(data) {
        let _ = serde_json::to_vec(&m);
        let _ = m.encode_to_vec();
    }
    if let Ok(m) = M::decode(data) {
        let _ = serde_json::to_vec(&m);
        let _ = m.encode_to_vec();
    }
}

fuzz_target!(|data: &[u8]| {
    both::<EvaluatePolicyRequest>(data);
    both::<TestPolicyRequest>(data);
    both::<ValidateCapsuleRequest>(data);
    both::<PushCapsuleRequest>(data);
});
