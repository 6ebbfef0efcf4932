//! Lockout events, written behind: VerifyKey only hands the fact to a bounded channel (never
//! waiting), and a background task finds the key's workspace and writes the event. If the channel
//! is full (a flood engaging lockouts faster than the database takes them) the event is dropped
//! and counted, so the hot path never slows down for its own audit trail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::{AuditAction, AuditActor, AuditRecord, CallContext};
use crate::key::KeyId;
use crate::store::Store;
use crate::timestamp::{UnixMicros, now_micros};
use crate::verify::ClientIp;

/// Lockout events waiting to be written; beyond this they are dropped (and counted).
pub const LOCKOUT_QUEUE: usize = 1024;

/// A key lockout that just engaged.
#[derive(Debug, Clone)]
pub struct LockoutEngaged {
    pub key_id: String,
    /// The address of the failure that engaged it, if the caller gave one.
    pub client_ip: Option<ClientIp>,
    pub time: UnixMicros,
}

/// The VerifyKey side: hands lockouts to the writer without waiting.
#[derive(Debug, Clone)]
pub struct LockoutAuditor {
    sender: mpsc::Sender<LockoutEngaged>,
    dropped: Arc<AtomicU64>,
}

impl LockoutAuditor {
    /// The auditor and the receiving end its writer (`write_lockouts`) reads.
    pub fn channel() -> (Self, mpsc::Receiver<LockoutEngaged>) {
        let (sender, receiver) = mpsc::channel(LOCKOUT_QUEUE);
        let auditor = Self {
            sender,
            dropped: Arc::default(),
        };
        (auditor, receiver)
    }

    pub fn engaged(&self, key_id: &str, client_ip: Option<ClientIp>) {
        let event = LockoutEngaged {
            key_id: key_id.to_owned(),
            client_ip,
            time: now_micros(),
        };
        if self.sender.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("lockout event dropped: the audit writer is behind");
        }
    }

    /// Lockout events dropped because the writer was behind, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes each lockout as an audit event of its key's workspace, until every auditor is gone.
/// A key id that names no key (a lockout on garbage) has no workspace and leaves no event.
pub async fn write_lockouts(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<LockoutEngaged>) {
    while let Some(lockout) = receiver.recv().await {
        if let Err(error) = write_one(store.as_ref(), &lockout).await {
            tracing::warn!(%error, key_id = %lockout.key_id, "lockout event not written");
        }
    }
}

async fn write_one(store: &dyn Store, lockout: &LockoutEngaged) -> crate::error::Result<()> {
    let Some(key_id) = KeyId::parse(&lockout.key_id) else {
        return Ok(());
    };
    let Some(stored) = store.find_key_for_verify(&key_id).await? else {
        return Ok(());
    };
    let context = CallContext {
        client_ip: lockout
            .client_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        ..CallContext::default()
    };
    let record = AuditRecord::new(
        AuditAction::Lockout,
        AuditActor::system("lockout"),
        lockout.time,
        context,
    );
    store
        .insert_audit_event(&stored.key.workspace_id, &key_id, &record)
        .await
}
