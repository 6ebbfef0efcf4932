//! Usage of local VALID verdicts: counted per key with two atomic operations on the warm path,
//! reported to the authority (ReportUsage) every interval, in batches of at most 1000 keys of
//! one workspace, each with its own request id. A batch that fails with a retryable error is sent
//! again with the same id (so it counts once, whatever the network did) before anything newer.
//!
//! Loss bound: a crash loses the counts not yet reported, at most one interval's (plus batches
//! still being retried because the authority was unreachable); a graceful `shutdown` reports
//! everything.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::pb;
use crate::{Error, KeyAuthorityClient};

/// Keys in one ReportUsage call (the server's limit).
const MAX_BATCH: usize = 1000;

/// One key's uncounted local verdicts.
#[derive(Debug)]
pub(crate) struct UsageCell {
    key_id: Arc<str>,
    workspace_id: Arc<str>,
    requests: AtomicU64,
    /// Microseconds since the Unix epoch.
    last_used: AtomicI64,
}

impl UsageCell {
    pub fn new(key_id: Arc<str>, workspace_id: Arc<str>) -> Self {
        Self {
            key_id,
            workspace_id,
            requests: AtomicU64::new(0),
            last_used: AtomicI64::new(0),
        }
    }

    /// Counts one local VALID verdict given at `now` (microseconds).
    pub fn record(&self, now: i64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_used.fetch_max(now, Ordering::Relaxed);
    }
}

/// A batch on its way to the authority.
#[derive(Debug, Clone)]
struct Batch {
    request: pb::ReportUsageRequest,
}

/// Every key's usage cell, and the batches not yet accepted.
pub(crate) struct UsageBook {
    cells: Mutex<HashMap<Arc<str>, Arc<UsageCell>>>,
    outbox: tokio::sync::Mutex<VecDeque<Batch>>,
    reported: AtomicU64,
}

impl UsageBook {
    pub fn new() -> Self {
        Self {
            cells: Mutex::default(),
            outbox: tokio::sync::Mutex::default(),
            reported: AtomicU64::new(0),
        }
    }

    /// The cell of `key_id` (one per key, kept across refills of its state).
    pub fn cell(&self, key_id: &Arc<str>, workspace_id: &str) -> Arc<UsageCell> {
        self.lock()
            .entry(key_id.clone())
            .or_insert_with(|| Arc::new(UsageCell::new(key_id.clone(), workspace_id.into())))
            .clone()
    }

    /// Verdicts the authority has accepted reports of.
    pub fn reported(&self) -> u64 {
        self.reported.load(Ordering::Relaxed)
    }

    /// Sends the batches not yet accepted, in order, or else moves every count into new batches
    /// (one request id each) and sends those. Stops at the first one the authority could not
    /// take now; it is sent again, with the same id, next time. Returns the error that stopped
    /// it, if any.
    pub async fn report(&self, client: &KeyAuthorityClient) -> Result<(), Error> {
        let mut outbox = self.outbox.lock().await;
        // New counts become batches only once the earlier ones are accepted: while the authority
        // cannot take them, counts keep adding up in the cells (memory bounded by the keys),
        // instead of piling up batches.
        if outbox.is_empty() {
            outbox.extend(self.take_batches());
        }
        while let Some(batch) = outbox.front() {
            match client.report_usage(batch.request.clone()).await {
                Ok(answer) => {
                    if !answer.skipped_key_ids.is_empty() {
                        tracing::warn!(
                            skipped = answer.skipped_key_ids.len(),
                            "key-authority counted no usage for some keys"
                        );
                    }
                    let sent: i64 = batch.request.usage.iter().map(|usage| usage.requests).sum();
                    self.reported
                        .fetch_add(u64::try_from(sent).unwrap_or(0), Ordering::Relaxed);
                    outbox.pop_front();
                }
                Err(error) if is_retryable(&error) => return Err(error),
                Err(error) => {
                    // Retrying cannot help (e.g. the credential may not report usage): say so
                    // loudly rather than retry forever.
                    tracing::error!(code = ?error.code(), message = error.message(), "key-authority refused a usage report: its counts are lost");
                    outbox.pop_front();
                }
            }
        }
        Ok(())
    }

    /// The counts since the last call, as batches, each cell reset to zero as it is read (a
    /// verdict counted meanwhile goes into the next batch). Cells no state uses any more and
    /// with nothing to report are forgotten.
    fn take_batches(&self) -> Vec<Batch> {
        let mut by_workspace: HashMap<Arc<str>, Vec<pb::KeyUsage>> = HashMap::new();
        self.lock().retain(|_, cell| {
            let requests = cell.requests.swap(0, Ordering::AcqRel);
            if requests > 0 {
                let micros = cell.last_used.load(Ordering::Acquire);
                by_workspace
                    .entry(cell.workspace_id.clone())
                    .or_default()
                    .push(pb::KeyUsage {
                        key_id: cell.key_id.to_string(),
                        requests: i64::try_from(requests).unwrap_or(i64::MAX),
                        last_used_time: Some(prost_types::Timestamp {
                            seconds: micros.div_euclid(1_000_000),
                            nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
                        }),
                    });
            }
            // Still used by a cached state (this map holds one reference).
            requests > 0 || Arc::strong_count(cell) > 1
        });
        let mut batches = Vec::new();
        for (workspace_id, mut usage) in by_workspace {
            while !usage.is_empty() {
                let rest = usage.split_off(usage.len().min(MAX_BATCH));
                batches.push(Batch {
                    request: pb::ReportUsageRequest {
                        workspace_id: workspace_id.to_string(),
                        request_id: uuid::Uuid::new_v4().to_string(),
                        usage,
                    },
                });
                usage = rest;
            }
        }
        batches
    }

    /// Counts not yet accepted by the authority (for tests and shutdown reports).
    pub async fn unreported(&self) -> u64 {
        let pending: u64 = self
            .lock()
            .values()
            .map(|cell| cell.requests.load(Ordering::Acquire))
            .sum();
        let outbox: i64 = self
            .outbox
            .lock()
            .await
            .iter()
            .flat_map(|batch| &batch.request.usage)
            .map(|usage| usage.requests)
            .sum();
        pending + u64::try_from(outbox).unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<UsageCell>>> {
        self.cells.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A report worth sending again with the same request id: the authority could not be reached or
/// said so.
fn is_retryable(error: &Error) -> bool {
    use tonic::Code;
    let unreached = matches!(
        error.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
    ) && error.reason().is_none();
    error.is_retryable() || unreached
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_become_batches_of_one_workspace_and_at_most_1000_keys() {
        let book = UsageBook::new();
        let mut cells = Vec::new();
        for index in 0..1500 {
            let key_id: Arc<str> = format!("K{index:011}").into();
            let cell = book.cell(&key_id, "acme");
            cell.record(2_000_000);
            cell.record(1_000_000);
            cells.push(cell);
        }
        let beta = book.cell(&Arc::from("BBBBBBBBBBBB"), "beta");
        beta.record(3_500_000);

        let mut batches = book.take_batches();
        batches.sort_by_key(|batch| {
            (
                batch.request.workspace_id.clone(),
                batch.request.usage.len(),
            )
        });
        let shape: Vec<(&str, usize)> = batches
            .iter()
            .map(|batch| {
                (
                    batch.request.workspace_id.as_str(),
                    batch.request.usage.len(),
                )
            })
            .collect();
        assert_eq!(shape, [("acme", 500), ("acme", 1000), ("beta", 1)]);
        let ids: std::collections::HashSet<&str> = batches
            .iter()
            .map(|batch| batch.request.request_id.as_str())
            .collect();
        assert_eq!(ids.len(), 3, "one request id per batch");
        let entry = &batches[2].request.usage[0];
        assert_eq!(entry.requests, 1);
        assert_eq!(
            entry.last_used_time,
            Some(prost_types::Timestamp {
                seconds: 3,
                nanos: 500_000_000
            })
        );
        assert!(
            batches[..2]
                .iter()
                .flat_map(|batch| &batch.request.usage)
                .all(|usage| usage.requests == 2),
            "every verdict counted, the latest time kept"
        );

        // Taken means reset: nothing twice. Cells no state holds and with nothing to report
        // are forgotten.
        assert!(book.take_batches().is_empty());
        drop(cells);
        drop(beta);
        assert!(book.take_batches().is_empty());
        assert!(book.lock().is_empty());
    }
}
