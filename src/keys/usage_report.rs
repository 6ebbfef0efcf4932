//! ReportUsage: usage that caller-side verifiers counted (VALID verdicts they gave from their own
//! memory), added to the keys' counters once per batch.
//!
//! Who may write usage: a developer (or above) of the workspace, or an admin; a viewer may read
//! usage but never write it, since `total_requests` and `last_used_time` are what billing and
//! dormant-key reviews trust. Only keys of the caller's workspace count (a batch cannot touch
//! another workspace's keys, whatever ids it names), and only keys without a usage limit (a
//! limited key's uses are consumed by VerifyKey itself, atomically, never reported).
//!
//! Once per batch: the batch's request id is claimed in the same transaction as the counters
//! (`idempotency`), so a retry of a batch that committed counts nothing, and a retry of one that
//! did not commit counts it once.

use super::{KeyManager, ReportUsage};
use crate::audit::CallContext;
use crate::auth::policy::{Action, Caller};
use crate::error::{Error, Result};
use crate::key::KeyId;
use crate::store::UsageDelta;
use crate::timestamp::now_micros;

/// What a ReportUsage call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReported {
    /// The batch was applied by an earlier call: nothing counted now.
    pub replayed: bool,
    pub counted_keys: usize,
    /// Keys that counted nothing: unknown, of another workspace, or usage-limited.
    pub skipped_key_ids: Vec<KeyId>,
}

impl KeyManager {
    /// ReportUsage: adds a batch of counted usage to the caller's workspace's keys, once.
    pub async fn report_usage(
        &self,
        caller: &Caller,
        context: &CallContext,
        command: ReportUsage,
    ) -> Result<UsageReported> {
        let workspace_id = caller.workspace_for(&command.workspace_id)?;
        caller.authorize(Action::ReportUsage)?;
        if context.request_id.is_empty() {
            return Err(Error::invalid(
                "request_id",
                "is required: it makes a retried batch count once",
            ));
        }
        let now = now_micros();
        let actor = caller.actor();
        let request = self.idempotent_report(context, &workspace_id, actor.audit(), &command);
        let report = async {
            let claim = self.batch_claim(request.as_ref(), now);
            // A reporter's clock may run ahead: its last uses count as now, never later, so a
            // skewed clock loses no usage and no report can date a use in the future.
            let usage: Vec<_> = command
                .usage
                .iter()
                .map(|delta| UsageDelta {
                    last_used_time: delta.last_used_time.min(now),
                    ..delta.clone()
                })
                .collect();
            let skipped = self
                .store
                .report_usage(&workspace_id, &usage, claim.as_ref())
                .await?;
            Ok(UsageReported {
                replayed: false,
                counted_keys: command.usage.len() - skipped.len(),
                skipped_key_ids: skipped,
            })
        };
        let replay = async |_: &_, _| {
            Ok(UsageReported {
                replayed: true,
                counted_keys: 0,
                skipped_key_ids: Vec::new(),
            })
        };
        self.once(request.as_ref(), report, replay).await
    }
}
