//! ReportUsage: its request into a command (each entry checked, in key id order) and its result
//! into the response.

use super::convert::require_key_id;
use crate::error::Error;
use crate::keys::{ReportUsage, UsageReported};
use crate::pb;
use crate::store::UsageDelta;
use crate::timestamp;

/// Entries in one batch: a verifier reports every interval, so one batch covers the keys it
/// saw used in that interval; more go in the next batch.
pub const MAX_USAGE_ENTRIES: usize = 1000;
/// Verdicts one entry may report: far above what one process gives one key in an interval.
pub const MAX_REPORTED_REQUESTS: i64 = 1_000_000_000;

impl TryFrom<pb::ReportUsageRequest> for ReportUsage {
    type Error = Error;

    fn try_from(request: pb::ReportUsageRequest) -> Result<Self, Error> {
        if request.usage.is_empty() {
            return Err(Error::invalid("usage", "must not be empty"));
        }
        if request.usage.len() > MAX_USAGE_ENTRIES {
            return Err(Error::invalid("usage", "has more than 1000 entries"));
        }
        let mut usage = request
            .usage
            .iter()
            .map(delta_from_proto)
            .collect::<Result<Vec<_>, Error>>()?;
        // Key id order: the store takes row locks in it, and the batch's fingerprint is stable.
        usage.sort_by(|a, b| a.key_id.as_str().cmp(b.key_id.as_str()));
        if usage
            .windows(2)
            .any(|pair| pair[0].key_id == pair[1].key_id)
        {
            return Err(Error::invalid("usage", "names a key more than once"));
        }
        Ok(Self {
            workspace_id: request.workspace_id,
            usage,
        })
    }
}

fn delta_from_proto(entry: &pb::KeyUsage) -> Result<UsageDelta, Error> {
    let key_id = require_key_id(&entry.key_id)
        .map_err(|_| Error::invalid("usage.key_id", "is not a key id"))?;
    if !(1..=MAX_REPORTED_REQUESTS).contains(&entry.requests) {
        return Err(Error::invalid(
            "usage.requests",
            "must be 1 to 1,000,000,000",
        ));
    }
    let last_used_time = entry
        .last_used_time
        .as_ref()
        .ok_or_else(|| Error::invalid("usage.last_used_time", "is required"))?;
    let last_used_time = timestamp::from_proto(last_used_time)
        .ok_or_else(|| Error::invalid("usage.last_used_time", "is out of range"))?;
    Ok(UsageDelta {
        key_id,
        requests: entry.requests,
        last_used_time,
    })
}

impl From<UsageReported> for pb::ReportUsageResponse {
    fn from(reported: UsageReported) -> Self {
        Self {
            replayed: reported.replayed,
            counted_keys: i32::try_from(reported.counted_keys).unwrap_or(i32::MAX),
            skipped_key_ids: reported
                .skipped_key_ids
                .into_iter()
                .map(|key_id| key_id.as_str().to_owned())
                .collect(),
        }
    }
}
