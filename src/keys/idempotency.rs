//! Safe retries (AIP-155): a mutation that carries a request id is done once; a retry with the
//! same id and the same parameters gets the first call's result again.

use crate::error::{Error, Result};

/// A request id as clients send it (`request_id`, or the `idempotency-key` header): a UUID in
/// any of its usual spellings, kept in the canonical lowercase, hyphenated form.
pub fn parse_request_id(field: &'static str, text: &str) -> Result<String> {
    uuid::Uuid::try_parse(text)
        .map(|id| id.hyphenated().to_string())
        .map_err(|_| {
            Error::invalid(
                field,
                "must be a UUID, such as 123e4567-e89b-12d3-a456-426614174000",
            )
        })
}
