//! A revoke on this replica is final, however long a key-state read that was already in flight
//! takes to come back: the verifier is built by hand around a store whose VerifyKey read the test
//! holds after the database has answered, so the answer it finally delivers is stale.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use key_authority::audit::{
    AuditAction, AuditActor, AuditEvent, AuditQuery, AuditRecord, CallContext,
};
use key_authority::error::Result;
use key_authority::events::{EventQuery, KeyEvent};
use key_authority::key::{
    Environment, HashPool, HashPriority, HashThreads, Key, KeyDescription, KeyId, KeyName,
    Metadata, Role, Scopes, SecretHasher, StoredKey, WorkspaceId,
};
use key_authority::keys::page_token::PageTokenCodec;
use key_authority::keys::{Actor, Expiration, KeyManager, KeySpec, TrialConfig};
use key_authority::store::{
    self, Changes, DoneRequest, ExpirySweep, ListQuery, Mutation, PoolStats, Revocation, Rotation,
    Store, StoreKind, UsageDelta,
};
use key_authority::timestamp::{UnixMicros, now_micros};
use key_authority::verify::{UsageRecorder, Verdict, Verifier, VerifyConfig, VerifyRequest};
use tokio::sync::oneshot;

use crate::common::{TestDb, on_both_databases, test_config};

/// How long a key's state is trusted: short, so that a slow read can outlast it.
const STATE_TTL: Duration = Duration::from_millis(100);

/// A read the test holds: it says when the database has answered, then waits for the release.
struct HeldRead {
    answered: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// The real store, except that the next `find_key_for_verify` can be held after the database
/// answered: to the verifier it looks like a read that takes as long as the test wants.
struct SlowReadStore {
    inner: Arc<dyn Store>,
    next_read: Mutex<Option<HeldRead>>,
}

impl SlowReadStore {
    /// Holds the next key-state read. Returns (the database has answered, release the answer).
    fn hold_next_read(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (answered, answered_rx) = oneshot::channel();
        let (release_tx, release) = oneshot::channel();
        *self.next_read.lock().unwrap() = Some(HeldRead { answered, release });
        (answered_rx, release_tx)
    }
}

#[async_trait]
impl Store for SlowReadStore {
    async fn insert_key(&self, key: &StoredKey, mutation: &Mutation) -> Result<()> {
        self.inner.insert_key(key, mutation).await
    }

    async fn get_key(&self, workspace_id: &WorkspaceId, key_id: &KeyId) -> Result<Option<Key>> {
        self.inner.get_key(workspace_id, key_id).await
    }

    async fn find_key_for_verify(&self, key_id: &KeyId) -> Result<Option<StoredKey>> {
        let held = self.next_read.lock().unwrap().take();
        let answer = self.inner.find_key_for_verify(key_id).await;
        if let Some(held) = held {
            let _ = held.answered.send(());
            let _ = held.release.await;
        }
        answer
    }

    async fn list_keys(&self, query: &ListQuery) -> Result<(Vec<Key>, i64)> {
        self.inner.list_keys(query).await
    }

    fn webhooks(&self) -> &dyn store::WebhookStore {
        self.inner.webhooks()
    }

    async fn revoke_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        revoked_by: &str,
        mutation: &Mutation,
    ) -> Result<Option<Revocation>> {
        self.inner
            .revoke_key(workspace_id, key_id, successors, revoked_by, mutation)
            .await
    }

    async fn rotate_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        version: i64,
        successor: &StoredKey,
        previous_expire_time: UnixMicros,
        mutation: &Mutation,
    ) -> Result<Option<Rotation>> {
        self.inner
            .rotate_key(
                workspace_id,
                key_id,
                version,
                successor,
                previous_expire_time,
                mutation,
            )
            .await
    }

    async fn update_key(&self, key: &Key, mutation: &Mutation) -> Result<Option<Key>> {
        self.inner.update_key(key, mutation).await
    }

    async fn find_request(&self, scope: &str, request_id: &str) -> Result<Option<DoneRequest>> {
        self.inner.find_request(scope, request_id).await
    }

    async fn delete_requests_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.inner.delete_requests_before(before, limit).await
    }

    async fn insert_audit_event(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        mutation: &Mutation,
    ) -> Result<()> {
        self.inner
            .insert_audit_event(workspace_id, key_id, mutation)
            .await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        self.inner.list_audit_events(query).await
    }

    async fn delete_audit_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.inner.delete_audit_events_before(before, limit).await
    }

    async fn list_key_events(&self, query: &EventQuery) -> Result<Vec<KeyEvent>> {
        self.inner.list_key_events(query).await
    }

    async fn latest_event_position(&self) -> Result<i64> {
        self.inner.latest_event_position().await
    }

    async fn events_pruned_through(&self) -> Result<i64> {
        self.inner.events_pruned_through().await
    }

    async fn delete_key_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.inner.delete_key_events_before(before, limit).await
    }

    async fn announce_expired_keys(&self, now: UnixMicros, limit: u32) -> Result<ExpirySweep> {
        self.inner.announce_expired_keys(now, limit).await
    }

    async fn record_usage(
        &self,
        deltas: &[UsageDelta],
    ) -> std::result::Result<(), store::UsageWriteError> {
        self.inner.record_usage(deltas).await
    }

    async fn report_usage(
        &self,
        workspace_id: &WorkspaceId,
        deltas: &[UsageDelta],
        claim: Option<&store::RequestClaim>,
    ) -> Result<Vec<KeyId>> {
        self.inner.report_usage(workspace_id, deltas, claim).await
    }

    async fn consume_usage(&self, budget_id: &str, cost: i64) -> Result<Option<i64>> {
        self.inner.consume_usage(budget_id, cost).await
    }

    async fn delete_ended_trial_keys(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.inner.delete_ended_trial_keys(before, limit).await
    }

    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>> {
        self.inner.shared_secret(name).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }

    fn changes(&self) -> Changes {
        self.inner.changes()
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// One replica's verifier and key manager sharing one state cache, as `server::App` builds them.
struct Replica {
    store: Arc<SlowReadStore>,
    verifier: Arc<Verifier>,
    keys: KeyManager,
}

impl Replica {
    async fn build(db: &TestDb) -> Self {
        let config = test_config(db);
        let store = Arc::new(SlowReadStore {
            inner: store::open(&db.url, 4).await.expect("the database opens"),
            next_read: Mutex::new(None),
        });
        let shared: Arc<dyn Store> = store.clone();
        let hashes = HashPool::new(
            SecretHasher::new(config.hash_params).unwrap(),
            HashThreads::new(1, HashPriority::Normal).unwrap(),
        );
        let verifier = Arc::new(Verifier::new(
            shared.clone(),
            hashes.clone(),
            UsageRecorder::new(shared.clone()),
            &VerifyConfig {
                state_ttl: STATE_TTL,
                ..VerifyConfig::default()
            },
        ));
        let keys = KeyManager::new(
            shared,
            hashes,
            config.brand,
            PageTokenCodec::new(vec![7; 32]),
            verifier.invalidator(),
            TrialConfig::default(),
        );
        Self {
            store,
            verifier,
            keys,
        }
    }
}

fn admin() -> Actor {
    Actor::admin()
}

/// The audit event of an admin's change, as the key manager's callers build it.
fn by_admin(action: AuditAction) -> AuditRecord {
    AuditRecord::new(
        action,
        AuditActor::admin(),
        now_micros(),
        CallContext::default(),
    )
}

fn acme() -> WorkspaceId {
    WorkspaceId::parse("acme").unwrap()
}

async fn a_revoke_outlasts_a_read_slower_than_the_state_ttl(db: TestDb) {
    let replica = Replica::build(&db).await;
    let issued = replica
        .keys
        .create(
            acme(),
            KeySpec {
                name: KeyName::parse("slow read").unwrap(),
                description: KeyDescription::default(),
                scopes: Scopes::default(),
                environment: Environment::Live,
                role: Role::Developer,
                expiration: Expiration::Never,
                metadata: Metadata::default(),
                usage_limit: 0,
            },
            &admin(),
            by_admin(AuditAction::Issue),
        )
        .await
        .unwrap();
    let key_id = issued.key.key_id.clone();

    // A cold verify whose state read returns "active" and is then held.
    let (answered, release) = replica.store.hold_next_read();
    let in_flight = tokio::spawn({
        let verifier = replica.verifier.clone();
        let plaintext = issued.plaintext.clone();
        async move { verifier.verify(VerifyRequest::key(&plaintext)).await }
    });
    answered.await.expect("the held read reached the database");

    replica
        .keys
        .revoke_in(
            &acme(),
            &key_id,
            false,
            &admin(),
            by_admin(AuditAction::Revoke),
        )
        .await
        .unwrap();
    // A verify that starts after the revoke returned joins the held read (single-flight) while
    // the test waits below; had it started after the release, it would read the revoke anyway.
    let joiner = tokio::spawn({
        let verifier = replica.verifier.clone();
        let plaintext = issued.plaintext.clone();
        async move { verifier.verify(VerifyRequest::key(&plaintext)).await }
    });
    // The scenario itself: the stale read stays in flight for more than twice the state TTL, so
    // anything that remembers the revoke only for a TTL has forgotten it when the read lands.
    tokio::time::sleep(STATE_TTL * 3).await;
    release.send(()).unwrap();
    // It began before the revoke, so either answer is honest; it must only not poison the cache.
    in_flight
        .await
        .unwrap()
        .expect("the in-flight verify answers");

    let joined = joiner.await.unwrap().unwrap();
    assert_revoked(&joined, "a verify that started after the revoke");
    let fresh = replica
        .verifier
        .verify(VerifyRequest::key(&issued.plaintext))
        .await
        .unwrap();
    assert_revoked(&fresh, "a verify after the stale read landed");
}

fn assert_revoked(verdict: &Verdict, which: &str) {
    assert!(
        matches!(verdict, Verdict::Revoked(_)),
        "{which} must say revoked, got {verdict:?}"
    );
}

on_both_databases!(a_revoke_outlasts_a_read_slower_than_the_state_ttl);
