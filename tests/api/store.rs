//! The `Store` conformance suite: the same cases, straight through the trait, against a real
//! SQLite file and a real PostgreSQL database, so the two implementations cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Poll;

use key_authority::audit::{
    ActorKind, AuditAction, AuditActor, AuditQuery, AuditRecord, CallContext,
};
use key_authority::error::Error;
use key_authority::events::{EventQuery, KeyEvent};
use key_authority::key::{
    Environment, Key, KeyDescription, KeyId, KeyName, Metadata, Role, Scopes, StoredKey,
    WorkspaceId,
};
use key_authority::store::{
    self, Change, ExpirySweep, ListQuery, Mutation, RequestClaim, Store, StoreKind, UsageDelta,
};
use key_authority::timestamp::UnixMicros;
use tokio_stream::StreamExt as _;

use crate::common::{Backend, TestDb, audit_events, on_both_databases};

/// "Now" in every case: a fixed instant, so that every time in the assertions is exact.
pub(crate) const NOW: UnixMicros = 1_800_000_000_000_000;
pub(crate) const SECOND: UnixMicros = 1_000_000;

pub(crate) async fn open(db: &TestDb) -> Arc<dyn Store> {
    store::open(&db.url, 4).await.expect("the database opens")
}

fn workspace(name: &str) -> WorkspaceId {
    WorkspaceId::parse(name).expect("a valid workspace id")
}

/// A mutation with its audit event, without a request id.
fn audit(action: &str, actor: &str, occur_time: UnixMicros) -> Mutation {
    let action = AuditAction::from_db(action).expect("a known action");
    let actor = match actor.strip_prefix("user:") {
        Some(subject) => AuditActor::user(subject),
        None => AuditActor::admin(),
    };
    Mutation::new(
        AuditRecord::new(action, actor, occur_time, CallContext::default()),
        None,
    )
}

/// A key of `workspace_id` as IssueKey would build it (with `created_by` "admin", the actor of
/// `audit("issue", "admin", ..)`); a limited key brings its own budget.
pub(crate) fn new_key(workspace_id: &str, create_time: UnixMicros, usage_limit: i64) -> StoredKey {
    let key_id = KeyId::generate();
    StoredKey {
        key: Key {
            prefix: format!("ka_live_{key_id}"),
            budget_id: (usage_limit > 0).then(|| key_id.as_str().to_owned()),
            key_id,
            workspace_id: workspace(workspace_id),
            name: KeyName::parse("conformance").unwrap(),
            description: KeyDescription::parse("a key of the store suite").unwrap(),
            scopes: Scopes::from_stored(vec!["read".to_owned(), "write".to_owned()]),
            role: Role::Developer,
            environment: Environment::Live,
            create_time,
            expire_time: None,
            revoke_time: None,
            last_used_time: None,
            total_requests: 0,
            metadata: Metadata::from_stored(BTreeMap::from([("team".to_owned(), "a".to_owned())])),
            rotated_from_key_id: None,
            rotated_to_key_id: None,
            created_by: "admin".to_owned(),
            revoked_by: None,
            usage_limit,
            usage_remaining: usage_limit,
            enabled: true,
            version: 1,
            update_time: None,
        },
        secret_hash: format!("$argon2id$v=19$m=1024,t=1,p=1$not-a-real-hash-{create_time}"),
    }
}

/// The successor of `previous` in its rotation chain, drawing on the same budget.
fn successor_of(previous: &Key, create_time: UnixMicros) -> StoredKey {
    let mut successor = new_key(
        previous.workspace_id.as_str(),
        create_time,
        previous.usage_limit,
    );
    successor.key.rotated_from_key_id = Some(previous.key_id.clone());
    successor.key.budget_id = previous.budget_id.clone();
    successor
}

pub(crate) async fn insert(store: &dyn Store, key: &StoredKey) {
    store
        .insert_key(key, &audit("issue", "admin", key.key.create_time))
        .await
        .expect("the key is inserted");
}

/// Rotates `previous` to a new successor (the old key ending at `NOW`) and returns the successor.
async fn rotate(store: &dyn Store, previous: &Key, create_time: UnixMicros) -> Key {
    let successor = successor_of(previous, create_time);
    store
        .rotate_key(
            &previous.workspace_id,
            &previous.key_id,
            previous.version,
            &successor,
            NOW + 3600 * SECOND,
            &audit("rotate", "admin", create_time),
        )
        .await
        .expect("the rotation commits")
        .expect("the key was rotatable")
        .successor
}

fn ids(keys: &[Key]) -> Vec<String> {
    keys.iter()
        .map(|key| key.key_id.as_str().to_owned())
        .collect()
}

async fn the_kind_is_the_database_opened(db: TestDb) {
    let store = open(&db).await;
    let expected = match db.backend {
        Backend::Sqlite => (StoreKind::Sqlite, "sqlite", false),
        Backend::Postgres => (StoreKind::Postgres, "postgres", true),
    };
    let kind = store.kind();
    assert_eq!((kind, kind.as_str(), kind.is_shared()), expected);
    store.close().await;
}

async fn an_inserted_key_reads_back_exactly(db: TestDb) {
    let store = open(&db).await;
    let unlimited = new_key("acme", NOW, 0);
    let limited = new_key("acme", NOW + SECOND, 10);
    insert(&*store, &unlimited).await;
    insert(&*store, &limited).await;

    let read = store
        .get_key(&workspace("acme"), &unlimited.key.key_id)
        .await
        .unwrap();
    assert_eq!(read, Some(unlimited.key.clone()));
    let read = store
        .get_key(&workspace("acme"), &limited.key.key_id)
        .await
        .unwrap();
    assert_eq!(
        read,
        Some(limited.key.clone()),
        "usage_remaining from the new budget"
    );

    let found = store
        .find_key_for_verify(&limited.key.key_id)
        .await
        .unwrap()
        .expect("found by id alone");
    assert_eq!(found.key, limited.key);
    assert_eq!(found.secret_hash, limited.secret_hash);

    assert_eq!(
        store
            .get_key(&workspace("other"), &unlimited.key.key_id)
            .await
            .unwrap(),
        None,
        "another workspace never sees the key"
    );
    let unknown = KeyId::generate();
    assert!(store.find_key_for_verify(&unknown).await.unwrap().is_none());
    let ids = [unlimited.key.key_id.as_str(), limited.key.key_id.as_str()];
    assert_eq!(
        audit_events(&db).await,
        ids.map(|id| (id.to_owned(), "issue".to_owned(), "admin".to_owned()))
    );
    store.close().await;
}

async fn a_duplicate_key_id_is_a_conflict(db: TestDb) {
    let store = open(&db).await;
    let key = new_key("acme", NOW, 0);
    insert(&*store, &key).await;

    let again = store
        .insert_key(&key, &audit("issue", "admin", NOW + SECOND))
        .await;
    assert!(matches!(again, Err(Error::Conflict)), "{again:?}");
    assert_eq!(
        audit_events(&db).await.len(),
        1,
        "the failed insert wrote no audit record"
    );
    store.close().await;
}

async fn a_closed_store_is_unavailable(db: TestDb) {
    let store = open(&db).await;
    store.ping().await.expect("an open store answers");
    store.close().await;
    let ping = store.ping().await;
    assert!(matches!(ping, Err(Error::Unavailable(_))), "{ping:?}");
}

async fn lists_page_newest_first_with_exact_totals(db: TestDb) {
    let store = open(&db).await;
    // Two keys share a create time: the key id breaks the tie, descending.
    let mut keys: Vec<StoredKey> = (0..5)
        .map(|n| new_key("acme", NOW + n * SECOND, 0))
        .collect();
    keys.push(new_key("acme", NOW + 4 * SECOND, 0));
    let revoked = new_key("acme", NOW + 10 * SECOND, 0);
    let mut expired = new_key("acme", NOW + 11 * SECOND, 0);
    expired.key.expire_time = Some(NOW + 20 * SECOND);
    for key in keys.iter().chain([&revoked, &expired]) {
        insert(&*store, key).await;
    }
    insert(&*store, &new_key("other", NOW + 12 * SECOND, 0)).await;
    store
        .revoke_key(
            &workspace("acme"),
            &revoked.key.key_id,
            false,
            "admin",
            &audit("revoke", "admin", NOW + 13 * SECOND),
        )
        .await
        .unwrap()
        .expect("the key exists");

    let mut expected: Vec<&StoredKey> = keys.iter().collect();
    expected.sort_by(|a, b| {
        (b.key.create_time, b.key.key_id.as_str()).cmp(&(a.key.create_time, a.key.key_id.as_str()))
    });
    let expected_active: Vec<String> = expected
        .iter()
        .map(|key| key.key.key_id.as_str().to_owned())
        .collect();

    // Active keys only, at a time when `expired` has expired: pages of 4, then 2, then none.
    let later = NOW + 30 * SECOND;
    let mut listed = Vec::new();
    let mut after = None;
    let mut page_sizes = Vec::new();
    loop {
        let (page, total) = store
            .list_keys(&ListQuery {
                workspace_id: workspace("acme"),
                include_inactive: false,
                after: after.clone(),
                limit: 4,
                now: later,
            })
            .await
            .unwrap();
        assert_eq!(total, 6);
        page_sizes.push(page.len());
        let Some(last) = page.last() else { break };
        after = Some((last.create_time, last.key_id.clone()));
        listed.extend(ids(&page));
    }
    assert_eq!(page_sizes, [4, 2, 0]);
    assert_eq!(listed, expected_active);

    // With inactive keys, and before `expired` expires: all eight, newest first.
    let (page, total) = store
        .list_keys(&ListQuery {
            workspace_id: workspace("acme"),
            include_inactive: true,
            after: None,
            limit: 100,
            now: NOW,
        })
        .await
        .unwrap();
    assert_eq!(total, 8);
    let mut all = vec![
        expired.key.key_id.as_str().to_owned(),
        revoked.key.key_id.as_str().to_owned(),
    ];
    all.extend(expected_active);
    assert_eq!(ids(&page), all);
    store.close().await;
}

async fn revoke_with_and_without_successors(db: TestDb) {
    let store = open(&db).await;
    let acme = workspace("acme");
    let first = new_key("acme", NOW, 0);
    insert(&*store, &first).await;
    let second = rotate(&*store, &first.key, NOW + SECOND).await;
    let third = rotate(&*store, &second, NOW + 2 * SECOND).await;
    let id = |key: &Key| key.key_id.as_str().to_owned();

    // Alone: only the key itself.
    let revocation = store
        .revoke_key(
            &acme,
            &first.key.key_id,
            false,
            "user:ann",
            &audit("revoke", "user:ann", NOW + 3 * SECOND),
        )
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!(
        revocation.newly_revoked,
        std::slice::from_ref(&first.key.key_id)
    );
    assert!(revocation.successors.is_empty());
    assert_eq!(revocation.key.revoke_time, Some(NOW + 3 * SECOND));
    assert_eq!(revocation.key.revoked_by.as_deref(), Some("user:ann"));
    let still_active = store.get_key(&acme, &second.key_id).await.unwrap();
    assert_eq!(still_active.unwrap().revoke_time, None);

    // Again, with successors: the revoked key stays as it was, the chain follows.
    let revocation = store
        .revoke_key(
            &acme,
            &first.key.key_id,
            true,
            "user:bob",
            &audit("revoke", "user:bob", NOW + 4 * SECOND),
        )
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!(
        revocation.newly_revoked,
        [second.key_id.clone(), third.key_id.clone()]
    );
    assert_eq!(ids(&revocation.successors), [id(&second), id(&third)]);
    assert_eq!(revocation.key.revoke_time, Some(NOW + 3 * SECOND));
    assert_eq!(revocation.key.revoked_by.as_deref(), Some("user:ann"));
    for successor in &revocation.successors {
        assert_eq!(successor.revoke_time, Some(NOW + 4 * SECOND));
        assert_eq!(successor.revoked_by.as_deref(), Some("user:bob"));
    }

    // Nothing left to revoke; unknown keys and other workspaces are `None`.
    let revocation = store
        .revoke_key(
            &acme,
            &third.key_id,
            true,
            "admin",
            &audit("revoke", "admin", NOW),
        )
        .await
        .unwrap()
        .expect("the key exists");
    assert!(revocation.newly_revoked.is_empty());
    let elsewhere = store
        .revoke_key(
            &workspace("other"),
            &first.key.key_id,
            true,
            "admin",
            &audit("revoke", "admin", NOW),
        )
        .await
        .unwrap();
    assert!(elsewhere.is_none());

    let events: Vec<(String, String)> = audit_events(&db)
        .await
        .into_iter()
        .map(|(key_id, action, _)| (key_id, action))
        .collect();
    let event = |key: &Key, action: &str| (id(key), action.to_owned());
    assert_eq!(
        events,
        [
            event(&first.key, "issue"),
            // A rotation is one event, on the key rotated (its successor is in its changes).
            event(&first.key, "rotate"),
            event(&second, "rotate"),
            event(&first.key, "revoke"),
            // Revoked already: the call's one event says UNCHANGED; the chain's keys each get
            // their own.
            event(&first.key, "revoke"),
            event(&second, "revoke"),
            event(&third, "revoke"),
            event(&third, "revoke"),
        ]
    );
    store.close().await;
}

async fn a_key_rotates_once(db: TestDb) {
    let store = open(&db).await;
    let acme = workspace("acme");
    let mut original = new_key("acme", NOW, 0);
    original.key.expire_time = Some(NOW + 100 * 3600 * SECOND);
    insert(&*store, &original).await;

    let successor = successor_of(&original.key, NOW + SECOND);
    let rotation = store
        .rotate_key(
            &acme,
            &original.key.key_id,
            original.key.version,
            &successor,
            NOW + 3600 * SECOND,
            &audit("rotate", "admin", NOW + SECOND),
        )
        .await
        .unwrap()
        .expect("an active key rotates");
    let expected_previous = Key {
        rotated_to_key_id: Some(successor.key.key_id.clone()),
        expire_time: Some(NOW + 3600 * SECOND),
        version: original.key.version + 1,
        update_time: Some(NOW + SECOND),
        ..original.key.clone()
    };
    assert_eq!(rotation.previous, expected_previous);
    assert_eq!(rotation.successor, successor.key);

    // A second rotation of the same key loses, and its successor is never inserted.
    let loser = successor_of(&original.key, NOW + 2 * SECOND);
    let again = store
        .rotate_key(
            &acme,
            &original.key.key_id,
            original.key.version,
            &loser,
            NOW + 3600 * SECOND,
            &audit("rotate", "admin", NOW + 2 * SECOND),
        )
        .await
        .unwrap();
    assert!(again.is_none());
    assert!(
        store
            .find_key_for_verify(&loser.key.key_id)
            .await
            .unwrap()
            .is_none()
    );

    // A revoked key does not rotate.
    store
        .revoke_key(
            &acme,
            &successor.key.key_id,
            false,
            "admin",
            &audit("revoke", "admin", NOW + 3 * SECOND),
        )
        .await
        .unwrap();
    let revoked = store
        .rotate_key(
            &acme,
            &successor.key.key_id,
            // The version after its revocation: only the revocation stops this rotation.
            successor.key.version + 1,
            &successor_of(&successor.key, NOW + 4 * SECOND),
            NOW + 3600 * SECOND,
            &audit("rotate", "admin", NOW + 4 * SECOND),
        )
        .await
        .unwrap();
    assert!(revoked.is_none());
    store.close().await;
}

async fn a_chain_budget_gives_exactly_its_limit(db: TestDb) {
    let store = open(&db).await;
    let first = new_key("acme", NOW, 5);
    insert(&*store, &first).await;
    let second = rotate(&*store, &first.key, NOW + SECOND).await;
    let budget_id = first.key.key_id.as_str().to_owned();
    assert_eq!(second.budget_id.as_deref(), Some(budget_id.as_str()));

    // Twenty concurrent uses of one each: exactly five succeed, counting down to zero.
    let attempts: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            let budget_id = budget_id.clone();
            tokio::spawn(async move { store.consume_usage(&budget_id, 1).await.unwrap() })
        })
        .collect();
    let mut remaining = Vec::new();
    for attempt in attempts {
        remaining.extend(attempt.await.unwrap());
    }
    remaining.sort_unstable();
    assert_eq!(remaining, [0, 1, 2, 3, 4]);

    assert_eq!(store.consume_usage(&budget_id, 0).await.unwrap(), None);
    assert_eq!(
        store.consume_usage("no-such-budget", 0).await.unwrap(),
        None
    );
    for key in [&first.key, &second] {
        let read = store
            .get_key(&workspace("acme"), &key.key_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((read.usage_limit, read.usage_remaining), (5, 0));
    }

    // A cost larger than what is left takes nothing; a cost of 0 only checks.
    let other = new_key("acme", NOW, 3);
    insert(&*store, &other).await;
    let other_budget = other.key.key_id.as_str();
    assert_eq!(store.consume_usage(other_budget, 4).await.unwrap(), None);
    assert_eq!(store.consume_usage(other_budget, 0).await.unwrap(), Some(3));
    assert_eq!(store.consume_usage(other_budget, 3).await.unwrap(), Some(0));
    store.close().await;
}

async fn usage_batches_add_up(db: TestDb) {
    let store = open(&db).await;
    let a = new_key("acme", NOW, 0);
    let b = new_key("acme", NOW, 0);
    insert(&*store, &a).await;
    insert(&*store, &b).await;
    let delta = |key: &StoredKey, requests, last_used_time| UsageDelta {
        key_id: key.key.key_id.clone(),
        requests,
        last_used_time,
    };

    store
        .record_usage(&[delta(&a, 3, NOW + 5 * SECOND), delta(&b, 1, NOW + SECOND)])
        .await
        .unwrap();
    // An older last use never moves the time back; an unknown key changes nothing.
    let unknown = UsageDelta {
        key_id: KeyId::generate(),
        requests: 9,
        last_used_time: NOW,
    };
    store
        .record_usage(&[delta(&a, 4, NOW + 2 * SECOND), unknown])
        .await
        .unwrap();
    store.record_usage(&[]).await.unwrap();

    let read = |key: StoredKey| {
        let store = store.clone();
        async move {
            let key = store
                .get_key(&workspace("acme"), &key.key.key_id)
                .await
                .unwrap()
                .unwrap();
            (key.total_requests, key.last_used_time)
        }
    };
    assert_eq!(read(a).await, (7, Some(NOW + 5 * SECOND)));
    assert_eq!(read(b).await, (1, Some(NOW + SECOND)));
    store.close().await;
}

/// Two replicas flushing the same busy keys at once never deadlock (the soak found that they
/// did, when each flush was one transaction in its own order): batches over the same 100 keys,
/// in opposite orders, concurrently, all succeed and add up exactly.
async fn concurrent_usage_batches_never_deadlock(db: TestDb) {
    let first = open(&db).await;
    let second = open(&db).await;
    let mut keys = Vec::new();
    for _ in 0..100 {
        let key = new_key("acme", NOW, 0);
        insert(&*first, &key).await;
        keys.push(key.key.key_id);
    }
    let batch = |keys: &[KeyId]| -> Vec<UsageDelta> {
        keys.iter()
            .map(|key_id| UsageDelta {
                key_id: key_id.clone(),
                requests: 1,
                last_used_time: NOW,
            })
            .collect()
    };
    let forward = batch(&keys);
    let mut backward = forward.clone();
    backward.reverse();
    for _ in 0..10 {
        let (one, other) =
            tokio::join!(first.record_usage(&forward), second.record_usage(&backward));
        one.expect("the first flush");
        other.expect("the second flush");
    }
    for key_id in &keys {
        let key = first
            .get_key(&workspace("acme"), key_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(key.total_requests, 20, "{key_id}");
    }
    first.close().await;
    second.close().await;
}

async fn ended_trial_keys_go_in_bounded_batches(db: TestDb) {
    let store = open(&db).await;
    let trial = |expire_time: UnixMicros| {
        let mut key = new_key("trial", NOW - 3600 * SECOND, 10);
        key.key.environment = Environment::Trial;
        key.key.role = Role::Trial;
        key.key.expire_time = Some(expire_time);
        key
    };
    // Five ended trial keys, oldest first; one still running; a live key that ended long ago.
    let ended: Vec<StoredKey> = (0..5).map(|n| trial(NOW - (10 - n) * SECOND)).collect();
    let running = trial(NOW + 60 * SECOND);
    let mut live = new_key("acme", NOW - 3600 * SECOND, 0);
    live.key.expire_time = Some(NOW - 1800 * SECOND);
    for key in ended.iter().chain([&running, &live]) {
        insert(&*store, key).await;
    }
    let present = |key: &StoredKey| {
        let store = store.clone();
        let key_id = key.key.key_id.clone();
        async move { store.find_key_for_verify(&key_id).await.unwrap().is_some() }
    };

    assert_eq!(store.delete_ended_trial_keys(NOW, 2).await.unwrap(), 2);
    let mut left = Vec::new();
    for key in &ended {
        left.push(present(key).await);
    }
    assert_eq!(
        left,
        [false, false, true, true, true],
        "the oldest go first"
    );
    assert_eq!(store.delete_ended_trial_keys(NOW, 2).await.unwrap(), 2);
    assert_eq!(store.delete_ended_trial_keys(NOW, 2).await.unwrap(), 1);
    assert_eq!(store.delete_ended_trial_keys(NOW, 2).await.unwrap(), 0);

    for key in &ended {
        assert!(!present(key).await);
        assert_eq!(
            store
                .consume_usage(key.key.key_id.as_str(), 0)
                .await
                .unwrap(),
            None,
            "the budget went with its last key"
        );
    }
    assert!(present(&running).await);
    assert!(present(&live).await, "only trial keys are swept");
    assert_eq!(
        store
            .consume_usage(running.key.key_id.as_str(), 0)
            .await
            .unwrap(),
        Some(10)
    );
    store.close().await;
}

/// A change made through a second handle (another replica) reaches the first handle's feed on
/// PostgreSQL; on SQLite, where only this process writes, the feed never yields.
async fn changes_follow_the_database(db: TestDb) {
    let watcher = open(&db).await;
    let writer = open(&db).await;
    let mut changes = watcher.changes();
    let key = new_key("acme", NOW, 0);

    if !watcher.kind().is_shared() {
        insert(&*writer, &key).await;
        rotate(&*writer, &key.key, NOW + SECOND).await;
        writer
            .revoke_key(
                &workspace("acme"),
                &key.key.key_id,
                true,
                "admin",
                &audit("revoke", "admin", NOW + 2 * SECOND),
            )
            .await
            .unwrap();
        let polled = std::future::poll_fn(|cx| Poll::Ready(changes.as_mut().poll_next(cx))).await;
        assert!(polled.is_pending(), "{polled:?}");
        watcher.close().await;
        writer.close().await;
        return;
    }

    assert_eq!(
        next_key_change(&mut changes).await,
        Some(Change::Resync),
        "listening first"
    );
    // Inserting notifies nobody of a key change (a new key has no cached state anywhere), only
    // the event watchers.
    insert(&*writer, &key).await;
    let successor = rotate(&*writer, &key.key, NOW + SECOND).await;
    assert_eq!(
        next_key_change(&mut changes).await,
        Some(Change::Key(key.key.key_id.as_str().to_owned()))
    );
    writer
        .revoke_key(
            &workspace("acme"),
            &key.key.key_id,
            true,
            "admin",
            &audit("revoke", "admin", NOW + 2 * SECOND),
        )
        .await
        .unwrap();
    assert_eq!(
        next_key_change(&mut changes).await,
        Some(Change::Key(key.key.key_id.as_str().to_owned()))
    );
    assert_eq!(
        next_key_change(&mut changes).await,
        Some(Change::Key(successor.key_id.as_str().to_owned()))
    );
    watcher.close().await;
    writer.close().await;
}

/// The next change of the feed that is not a doorbell for event watchers (every mutation rings
/// it as well).
async fn next_key_change(changes: &mut store::Changes) -> Option<Change> {
    loop {
        match changes.next().await {
            Some(Change::Events) => continue,
            other => return other,
        }
    }
}

async fn updates_apply_to_the_version_read(db: TestDb) {
    let store = open(&db).await;
    let stored = new_key("acme", NOW, 0);
    insert(&*store, &stored).await;
    let mut changed = stored.key.clone();
    changed.name = KeyName::parse("renamed").unwrap();
    changed.scopes = Scopes::from_stored(vec!["read".to_owned()]);
    changed.enabled = false;
    changed.expire_time = Some(NOW + 99 * SECOND);

    let updated = store
        .update_key(&changed, &audit("disable", "admin", NOW + SECOND))
        .await
        .unwrap()
        .expect("the version read is current");
    assert_eq!(
        updated,
        Key {
            version: stored.key.version + 1,
            update_time: Some(NOW + SECOND),
            ..changed.clone()
        }
    );
    // The same version again is stale now: nothing is written, no event either.
    let stale = store
        .update_key(&changed, &audit("update", "admin", NOW + 2 * SECOND))
        .await
        .unwrap();
    assert!(stale.is_none());
    // A revoked key is final.
    store
        .revoke_key(
            &workspace("acme"),
            &stored.key.key_id,
            false,
            "admin",
            &audit("revoke", "admin", NOW + 3 * SECOND),
        )
        .await
        .unwrap();
    let after_revoke = Key {
        version: stored.key.version + 2,
        ..changed
    };
    assert!(
        store
            .update_key(&after_revoke, &audit("update", "admin", NOW + 4 * SECOND))
            .await
            .unwrap()
            .is_none()
    );
    let actions: Vec<String> = audit_events(&db)
        .await
        .into_iter()
        .map(|(_, action, _)| action)
        .collect();
    assert_eq!(actions, ["issue", "disable", "revoke"]);
    store.close().await;
}

fn claim(request_id: &str, key_id: &KeyId, create_time: UnixMicros) -> RequestClaim {
    RequestClaim {
        scope: "[\"acme\",\"admin\",\"admin\"]".to_owned(),
        request_id: request_id.to_owned(),
        operation: "IssueKey",
        fingerprint: "f1".to_owned(),
        key_id: key_id.as_str().to_owned(),
        salt: vec![7; 32],
        create_time,
        stale_before: create_time - 3600 * SECOND,
    }
}

async fn a_request_id_is_claimed_once(db: TestDb) {
    let store = open(&db).await;
    let first = new_key("acme", NOW, 0);
    let claimed = claim("r1", &first.key.key_id, NOW);
    let with_claim = |key: &StoredKey, time| Mutation {
        claim: Some(claim("r1", &key.key.key_id, time)),
        ..audit("issue", "admin", time)
    };
    store
        .insert_key(&first, &with_claim(&first, NOW))
        .await
        .unwrap();
    let done = store
        .find_request(&claimed.scope, "r1")
        .await
        .unwrap()
        .expect("the claim committed with the key");
    assert_eq!(
        (done.operation.as_str(), done.fingerprint.as_str()),
        ("IssueKey", "f1")
    );
    assert_eq!(done.key_id, first.key.key_id.as_str());
    assert_eq!((done.salt.clone(), done.create_time), (vec![7; 32], NOW));

    // A second mutation with the same claim writes nothing at all.
    let second = new_key("acme", NOW + SECOND, 0);
    let again = store
        .insert_key(&second, &with_claim(&second, NOW + SECOND))
        .await;
    assert!(matches!(again, Err(Error::DuplicateRequest)), "{again:?}");
    assert!(
        store
            .find_key_for_verify(&second.key.key_id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(audit_events(&db).await.len(), 1);
    // Another scope, or the same id once the claim is older than the window, is new.
    let elsewhere = Mutation {
        claim: Some(RequestClaim {
            scope: "other".to_owned(),
            ..claim("r1", &second.key.key_id, NOW + SECOND)
        }),
        ..audit("issue", "admin", NOW + SECOND)
    };
    store.insert_key(&second, &elsewhere).await.unwrap();
    let third = new_key("acme", NOW + 2 * SECOND, 0);
    let later = NOW + 7200 * SECOND;
    store
        .insert_key(&third, &with_claim(&third, later))
        .await
        .unwrap();
    let taken_over = store
        .find_request(&claimed.scope, "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken_over.key_id, third.key.key_id.as_str());
    // Claims go in bounded batches, oldest first.
    assert_eq!(store.delete_requests_before(later, 10).await.unwrap(), 1);
    assert_eq!(
        store.delete_requests_before(later + 1, 10).await.unwrap(),
        1
    );
    assert!(
        store
            .find_request(&claimed.scope, "r1")
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;
}

/// A mutation that fails takes its claim back with it; an event without a change (UpdateKey
/// that changed nothing) claims like any other mutation.
async fn only_committed_mutations_claim(db: TestDb) {
    let store = open(&db).await;
    let scope = claim("r", &KeyId::generate(), NOW).scope;
    let missing = KeyId::generate();
    let revoke = Mutation {
        claim: Some(claim("r1", &missing, NOW)),
        ..audit("revoke", "admin", NOW)
    };
    let revoked = store
        .revoke_key(&workspace("acme"), &missing, false, "admin", &revoke)
        .await
        .unwrap();
    assert!(revoked.is_none(), "no such key");
    assert!(store.find_request(&scope, "r1").await.unwrap().is_none());

    let key = new_key("acme", NOW, 0);
    insert(&*store, &key).await;
    let unchanged = Mutation {
        claim: Some(claim("r2", &key.key.key_id, NOW)),
        ..audit("update", "admin", NOW)
    };
    store
        .insert_audit_event(&workspace("acme"), &key.key.key_id, &unchanged)
        .await
        .unwrap();
    assert!(store.find_request(&scope, "r2").await.unwrap().is_some());
    let again = store
        .insert_audit_event(&workspace("acme"), &key.key.key_id, &unchanged)
        .await;
    assert!(matches!(again, Err(Error::DuplicateRequest)), "{again:?}");
    assert_eq!(audit_events(&db).await.len(), 2, "the issue and one update");
    store.close().await;
}

async fn audit_events_filter_page_and_prune(db: TestDb) {
    let store = open(&db).await;
    let acme = workspace("acme");
    let key = KeyId::generate();
    let other_key = KeyId::generate();
    for (n, (key_id, action, actor)) in [
        (&key, "issue", "admin"),
        (&key, "update", "user:ann"),
        (&other_key, "issue", "user:ann"),
        (&key, "lockout", "admin"),
    ]
    .into_iter()
    .enumerate()
    {
        let mutation = audit(action, actor, NOW + n as i64 * SECOND);
        store
            .insert_audit_event(&acme, key_id, &mutation)
            .await
            .unwrap();
    }
    store
        .insert_audit_event(&workspace("beta"), &key, &audit("issue", "admin", NOW))
        .await
        .unwrap();
    let query = AuditQuery {
        workspace_id: "acme".to_owned(),
        limit: 100,
        ..AuditQuery::default()
    };
    let list = |query: AuditQuery| {
        let store = store.clone();
        async move {
            store
                .list_audit_events(&query)
                .await
                .unwrap()
                .into_iter()
                .map(|event| (event.key_id, event.record.action.as_str()))
                .collect::<Vec<_>>()
        }
    };
    let k = key.as_str().to_owned();
    let o = other_key.as_str().to_owned();
    assert_eq!(
        list(query.clone()).await,
        [
            (k.clone(), "lockout"),
            (o.clone(), "issue"),
            (k.clone(), "update"),
            (k.clone(), "issue"),
        ]
    );
    let by_key = AuditQuery {
        key_id: Some(k.clone()),
        ..query.clone()
    };
    assert_eq!(list(by_key).await.len(), 3);
    let by_user = AuditQuery {
        actor_kind: Some(ActorKind::User),
        actor_id: Some("ann".to_owned()),
        ..query.clone()
    };
    assert_eq!(list(by_user).await.len(), 2);
    let by_action_and_time = AuditQuery {
        action: Some(AuditAction::Issue),
        start_time: Some(NOW + SECOND),
        end_time: Some(NOW + 3 * SECOND),
        ..query.clone()
    };
    assert_eq!(list(by_action_and_time).await, [(o.clone(), "issue")]);
    let all = store.list_audit_events(&query).await.unwrap();
    let after_second = AuditQuery {
        before_event_id: Some(all[1].event_id),
        limit: 1,
        ..query.clone()
    };
    assert_eq!(list(after_second).await, [(k.clone(), "update")]);

    // Pruning: bounded batches, oldest first, every workspace.
    assert_eq!(
        store
            .delete_audit_events_before(NOW + 2 * SECOND, 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_audit_events_before(NOW + 2 * SECOND, 10)
            .await
            .unwrap(),
        2
    );
    assert_eq!(list(query).await, [(k.clone(), "lockout"), (o, "issue")]);
    store.close().await;
}

/// Every event of the outbox, in position order.
async fn all_key_events(
    store: &dyn Store,
    workspace_id: Option<&str>,
    after: i64,
) -> Vec<KeyEvent> {
    store
        .list_key_events(&EventQuery {
            workspace_id: workspace_id.map(str::to_owned),
            after,
            limit: 1000,
        })
        .await
        .unwrap()
}

fn event_keys(events: &[KeyEvent]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|event| (event.event_type.as_str(), event.key_id.as_str()))
        .collect()
}

fn positions(events: &[KeyEvent]) -> Vec<i64> {
    events.iter().map(|event| event.position).collect()
}

/// The outbox: each mutation's event in its transaction, in one order, read by workspace and
/// after a position, a bounded number at a time; none for a mutation that changed nothing.
async fn key_events_list_in_order(db: TestDb) {
    let store = open(&db).await;
    assert_eq!(store.latest_event_position().await.unwrap(), 0);
    assert_eq!(store.events_pruned_through().await.unwrap(), 0);
    let acme = workspace("acme");
    let first = new_key("acme", NOW, 0);
    let other = new_key("beta", NOW + SECOND, 0);
    insert(&*store, &first).await;
    insert(&*store, &other).await;
    let successor = rotate(&*store, &first.key, NOW + 2 * SECOND).await;
    let revoke = audit("revoke", "user:ann", NOW + 3 * SECOND);
    store
        .revoke_key(&acme, &successor.key_id, false, "user:ann", &revoke)
        .await
        .unwrap()
        .expect("the key exists");

    let all = all_key_events(&*store, None, 0).await;
    let (f, o, s) = (
        first.key.key_id.as_str(),
        other.key.key_id.as_str(),
        successor.key_id.as_str(),
    );
    assert_eq!(
        event_keys(&all),
        [
            ("key.issued", f),
            ("key.issued", o),
            ("key.rotated", f),
            ("key.revoked", s)
        ]
    );
    assert!(positions(&all).windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(
        all.iter().map(|event| event.occur_time).collect::<Vec<_>>(),
        [NOW, NOW + SECOND, NOW + 2 * SECOND, NOW + 3 * SECOND],
        "at the time of the change"
    );
    assert_eq!(
        all.iter()
            .map(|event| event.workspace_id.as_str())
            .collect::<Vec<_>>(),
        ["acme", "beta", "acme", "acme"]
    );
    assert_eq!(all[3].actor, AuditActor::user("ann"));
    let last = all[3].position;
    assert_eq!(store.latest_event_position().await.unwrap(), last);

    // By workspace, after a position, a bounded number.
    let of_acme = all_key_events(&*store, Some("acme"), 0).await;
    assert_eq!(
        positions(&of_acme),
        [all[0].position, all[2].position, last]
    );
    let of_beta = all_key_events(&*store, Some("beta"), 0).await;
    assert_eq!(positions(&of_beta), [all[1].position]);
    assert_eq!(
        positions(&all_key_events(&*store, None, all[1].position).await),
        [all[2].position, last]
    );
    assert_eq!(
        positions(&all_key_events(&*store, Some("beta"), all[1].position).await),
        [0i64; 0]
    );
    let two = store
        .list_key_events(&EventQuery {
            workspace_id: None,
            after: 0,
            limit: 2,
        })
        .await
        .unwrap();
    assert_eq!(positions(&two), positions(&all[..2]));

    // Nothing changed, nothing announced: a revoked key revoked again, a stale rotation.
    store
        .revoke_key(&acme, &successor.key_id, false, "user:ann", &revoke)
        .await
        .unwrap();
    let stale = store
        .rotate_key(
            &acme,
            &first.key.key_id,
            first.key.version,
            &successor_of(&first.key, NOW + 4 * SECOND),
            NOW + 3600 * SECOND,
            &audit("rotate", "admin", NOW + 4 * SECOND),
        )
        .await
        .unwrap();
    assert!(stale.is_none());
    assert_eq!(store.latest_event_position().await.unwrap(), last);
    store.close().await;
}

/// The pruning deletes a prefix of the positions, a bounded batch at a time, and records how far
/// it went. An old event behind a recent one (`key.expired` is written after the key's end, at
/// its end) waits for the recent one: no event younger than the retention is deleted.
async fn key_events_are_pruned_as_a_prefix(db: TestDb) {
    let store = open(&db).await;
    for occur_time in [
        NOW - 50 * SECOND,
        NOW - 40 * SECOND,
        NOW - 30 * SECOND,
        NOW,
        NOW - 20 * SECOND,
    ] {
        let key = new_key("acme", occur_time, 0);
        store
            .insert_key(&key, &audit("issue", "admin", occur_time))
            .await
            .unwrap();
    }
    let written = positions(&all_key_events(&*store, None, 0).await);
    let before = NOW - 5 * SECOND;

    assert_eq!(store.delete_key_events_before(before, 2).await.unwrap(), 2);
    assert_eq!(store.events_pruned_through().await.unwrap(), written[1]);
    assert_eq!(
        positions(&all_key_events(&*store, None, 0).await),
        written[2..]
    );
    assert_eq!(store.delete_key_events_before(before, 2).await.unwrap(), 1);
    assert_eq!(store.events_pruned_through().await.unwrap(), written[2]);
    assert_eq!(store.delete_key_events_before(before, 2).await.unwrap(), 0);
    assert_eq!(
        positions(&all_key_events(&*store, None, 0).await),
        written[3..],
        "the recent event and the old one behind it are kept"
    );
    assert_eq!(store.events_pruned_through().await.unwrap(), written[2]);
    assert_eq!(store.latest_event_position().await.unwrap(), written[4]);

    // Everything, once it is all old: the latest position is still the last one written.
    assert_eq!(
        store
            .delete_key_events_before(NOW + SECOND, 10)
            .await
            .unwrap(),
        2
    );
    assert!(all_key_events(&*store, None, 0).await.is_empty());
    assert_eq!(store.events_pruned_through().await.unwrap(), written[4]);
    assert_eq!(store.latest_event_position().await.unwrap(), written[4]);
    insert(&*store, &new_key("acme", NOW + 2 * SECOND, 0)).await;
    let next = store.latest_event_position().await.unwrap();
    assert!(next > written[4], "positions are never reused");
    assert_eq!(positions(&all_key_events(&*store, None, 0).await), [next]);
    store.close().await;
}

/// `key.expired`: once per key, at its end, in the order keys ended, a bounded batch at a time;
/// none for a key revoked before its end. Two replicas sweeping at once announce each key once.
async fn expiries_are_announced_once(db: TestDb) {
    let store = open(&db).await;
    let replica = open(&db).await;
    let acme = workspace("acme");
    let ending = |expire_time: UnixMicros| {
        let mut key = new_key("acme", NOW - 3600 * SECOND, 0);
        key.key.expire_time = Some(expire_time);
        key
    };
    let ended = ending(NOW - 5 * SECOND);
    let revoked_first = ending(NOW - 3 * SECOND);
    let revoked_after = ending(NOW - 2 * SECOND);
    let later = ending(NOW + 60 * SECOND);
    for key in [&ended, &revoked_first, &revoked_after, &later] {
        insert(&*store, key).await;
    }
    for (key, at) in [
        (&revoked_first, NOW - 4 * SECOND),
        (&revoked_after, NOW - SECOND),
    ] {
        store
            .revoke_key(
                &acme,
                &key.key.key_id,
                false,
                "admin",
                &audit("revoke", "admin", at),
            )
            .await
            .unwrap()
            .expect("the key exists");
    }

    // One at a time, earliest first; the key revoked before its end takes its turn, silently.
    let sweep = |marked, announced| ExpirySweep { marked, announced };
    assert_eq!(
        store.announce_expired_keys(NOW, 1).await.unwrap(),
        sweep(1, 1)
    );
    assert_eq!(
        store.announce_expired_keys(NOW, 1).await.unwrap(),
        sweep(1, 0)
    );
    assert_eq!(
        store.announce_expired_keys(NOW, 1).await.unwrap(),
        sweep(1, 1)
    );
    assert_eq!(
        store.announce_expired_keys(NOW, 10).await.unwrap(),
        sweep(0, 0)
    );
    // Both replicas sweep when the last one has ended.
    let at = NOW + 61 * SECOND;
    let (one, two) = tokio::join!(
        store.announce_expired_keys(at, 10),
        replica.announce_expired_keys(at, 10)
    );
    assert_eq!(
        one.unwrap().announced + two.unwrap().announced,
        1,
        "once, by either replica"
    );
    assert_eq!(
        store.announce_expired_keys(at, 10).await.unwrap(),
        sweep(0, 0)
    );

    let expired: Vec<KeyEvent> = all_key_events(&*store, None, 0)
        .await
        .into_iter()
        .filter(|event| event.event_type == "key.expired")
        .collect();
    assert_eq!(
        expired
            .iter()
            .map(|event| (event.key_id.as_str(), event.occur_time))
            .collect::<Vec<_>>(),
        [
            (ended.key.key_id.as_str(), NOW - 5 * SECOND),
            (revoked_after.key.key_id.as_str(), NOW - 2 * SECOND),
            (later.key.key_id.as_str(), NOW + 60 * SECOND),
        ]
    );
    for event in &expired {
        assert_eq!(event.workspace_id, "acme");
        assert_eq!(event.actor, AuditActor::system("expiry"));
        assert!(event.changes.is_empty());
    }
    replica.close().await;
    store.close().await;
}

on_both_databases!(
    the_kind_is_the_database_opened,
    an_inserted_key_reads_back_exactly,
    a_duplicate_key_id_is_a_conflict,
    a_closed_store_is_unavailable,
    lists_page_newest_first_with_exact_totals,
    revoke_with_and_without_successors,
    a_key_rotates_once,
    a_chain_budget_gives_exactly_its_limit,
    usage_batches_add_up,
    concurrent_usage_batches_never_deadlock,
    ended_trial_keys_go_in_bounded_batches,
    changes_follow_the_database,
    updates_apply_to_the_version_read,
    a_request_id_is_claimed_once,
    only_committed_mutations_claim,
    audit_events_filter_page_and_prune,
    key_events_list_in_order,
    key_events_are_pruned_as_a_prefix,
    expiries_are_announced_once,
);
