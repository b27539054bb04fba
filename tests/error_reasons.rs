//! The registered error reasons: `anumate.common.v1.ErrorReason` in the
//! contract and `anumate_errors::Reason` in the code are one list, value for
//! value, each in the class its `(error_code)` option names.
#![allow(clippy::expect_used)] // a test crate: helpers panic on broken contracts

use anumate_errors::{ErrorCode, Reason};
use prost_reflect::{DescriptorPool, Value};

#[test]
fn the_code_and_the_contract_register_the_same_reasons() {
    let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let reasons = pool
        .get_enum_by_name("anumate.common.v1.ErrorReason")
        .expect("ErrorReason is in the contract");
    let codes = pool
        .get_enum_by_name("anumate.common.v1.ErrorCode")
        .expect("ErrorCode is in the contract");
    let ext = pool
        .get_extension_by_name("anumate.common.v1.error_code")
        .expect("the error_code option is in the contract");

    let mut in_proto = Vec::new();
    for value in reasons.values().filter(|v| v.number() != 0) {
        let name = value
            .name()
            .strip_prefix("ERROR_REASON_")
            .expect("reasons carry the enum prefix")
            .to_string();
        let options = value.options();
        assert!(options.has_extension(&ext), "{name} names its class");
        let class = match options.get_extension(&ext).as_ref() {
            Value::EnumNumber(n) => codes
                .get_value(*n)
                .expect("the class is an ErrorCode value")
                .name()
                .trim_start_matches("ERROR_CODE_")
                .to_string(),
            other => panic!("{name}: error_code is {other:?}"),
        };
        in_proto.push((name, value.number(), class));
    }
    let in_code: Vec<_> = Reason::all()
        .map(|r| {
            (
                r.as_str().to_string(),
                r.number(),
                r.code().as_str().to_string(),
            )
        })
        .collect();
    assert_eq!(in_code, in_proto);
}

#[test]
fn every_class_is_in_the_contract_with_its_generic_reason() {
    let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let codes = pool
        .get_enum_by_name("anumate.common.v1.ErrorCode")
        .expect("ErrorCode");
    let names: Vec<_> = codes
        .values()
        .filter(|v| v.number() != 0)
        .map(|v| v.name().trim_start_matches("ERROR_CODE_").to_string())
        .collect();
    let in_code: Vec<_> = ErrorCode::all().map(|c| c.as_str().to_string()).collect();
    assert_eq!(in_code, names);
    for code in ErrorCode::all() {
        assert_eq!(Reason::generic(code).as_str(), code.as_str());
    }
}
