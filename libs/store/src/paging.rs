//! Keyset pagination shared by every List RPC: page sizes (default 50, at most
//! 500) and opaque page tokens carrying the last key of the previous page.

use anumate_errors::Error;
use base64::Engine as _;

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Larger requested sizes are clamped to this.
pub const MAX_PAGE_SIZE: i64 = 500;

/// Validates a request's `page_size` and decodes its `page_token` (AIP-158:
/// both are top-level request fields, and errors name them so).
pub fn page_params(page_size: i32, page_token: &str) -> Result<(i64, Option<String>), Error> {
    let size = match page_size {
        n if n < 0 => {
            return Err(Error::invalid_argument("page_size", "must not be negative"));
        }
        0 => DEFAULT_PAGE_SIZE,
        n => i64::from(n).min(MAX_PAGE_SIZE),
    };
    if page_token.is_empty() {
        return Ok((size, None));
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(page_token)
        .map_err(|_| malformed_token())?;
    let key = String::from_utf8(bytes).map_err(|_| malformed_token())?;
    Ok((size, Some(key)))
}

/// The error for a page token this server did not issue (or that is not
/// valid for the request it came with).
pub fn malformed_token() -> Error {
    Error::invalid_argument("page_token", "malformed page token")
}

/// Encodes the last key of a page as the next page token.
pub fn encode_token(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

/// Given the rows of a query that fetched `size + 1`, keeps `size` of them and
/// returns the next page token (empty when this was the last page).
pub fn finish_page<T>(
    mut items: Vec<T>,
    size: i64,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let size = usize::try_from(size).unwrap_or(0);
    if items.len() <= size {
        return (items, String::new());
    }
    items.truncate(size);
    let next = items
        .last()
        .map(|item| encode_token(&key(item)))
        .unwrap_or_default();
    (items, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_defaulted_clamped_and_checked() {
        assert_eq!(page_params(0, "").unwrap(), (DEFAULT_PAGE_SIZE, None));
        assert_eq!(page_params(10_000, "").unwrap().0, MAX_PAGE_SIZE);
        let field = |r: Result<_, Error>| r.err().map(|e| e.violations[0].field.clone());
        assert_eq!(field(page_params(-1, "")).as_deref(), Some("page_size"));
        assert_eq!(field(page_params(10, "***")).as_deref(), Some("page_token"));
    }

    #[test]
    fn tokens_round_trip_and_the_last_page_has_none() {
        let (items, next) = finish_page(vec!["a", "b", "c"], 2, |s| s.to_string());
        assert_eq!(items, vec!["a", "b"]);
        assert_eq!(page_params(2, &next).unwrap(), (2, Some("b".to_string())));
        let (items, next) = finish_page(vec!["c"], 2, |s| s.to_string());
        assert_eq!((items.len(), next.as_str()), (1, ""));
    }
}
