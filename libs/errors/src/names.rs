//! The one name check: capsules, policies, tools and step ids are DNS labels
//! (SPEC §2). It lives here because every service and library already
//! depends on this crate and the check's product is this crate's precise
//! `INVALID_ARGUMENT` naming the field.

use crate::{Error, Result};

/// The longest DNS label.
pub const MAX_DNS_LABEL: usize = 63;

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most [`MAX_DNS_LABEL`] characters.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_LABEL
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `Ok` for a DNS label; else `INVALID_ARGUMENT` on `field`.
pub fn check_dns_label(field: &str, name: &str) -> Result<()> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            field,
            "must be a DNS label: lowercase letters, digits and '-', at most 63",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn dns_labels() {
        for ok in ["a", "refund-small-orders", "0x", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
            assert!(check_dns_label("name", ok).is_ok());
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
            let e = check_dns_label("policies.name", bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.message.starts_with("policies.name: "), "{}", e.message);
        }
    }
}
