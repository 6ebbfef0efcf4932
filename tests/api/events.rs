//! Key events: each mutation's event and payload, read through WatchKeyEvents; stored events then
//! live ones; resuming by position on either replica; slow readers; tenancy; pruning; shutdown.
//! Nothing here sleeps for a fixed time to let something happen: it awaits the event itself (with
//! a generous bound), or a later event that can only arrive after it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use key_authority::pb;
use prost::Message as _;
use prost_types::FieldMask;
use tonic::{Code, Streaming};

use crate::common::{
    Backend, KeysClient, TestApp, TestDb, jwt_user, key_of, keys_as, on_both_databases, query_rows,
    query_value, reason, test_config, with_dashboard_jwts,
};
use crate::verify::forge_numbered;

type Events = Streaming<pb::WatchKeyEventsResponse>;

/// How long an awaited event may take: far more than it ever should.
const PATIENCE: Duration = Duration::from_secs(20);

/// acme's events after `after_position`.
fn acme_after(after_position: i64) -> pb::WatchKeyEventsRequest {
    pb::WatchKeyEventsRequest {
        workspace_id: "acme".into(),
        after_position,
        ..Default::default()
    }
}

fn acme_from_now() -> pb::WatchKeyEventsRequest {
    pb::WatchKeyEventsRequest {
        workspace_id: "acme".into(),
        from_now: true,
        ..Default::default()
    }
}

/// Every workspace's events after `after_position` (admins only).
fn everything_after(after_position: i64) -> pb::WatchKeyEventsRequest {
    pb::WatchKeyEventsRequest {
        after_position,
        all_workspaces: true,
        ..Default::default()
    }
}

async fn watch(client: &mut KeysClient, request: pb::WatchKeyEventsRequest) -> Events {
    client
        .watch_key_events(request)
        .await
        .expect("WatchKeyEvents starts")
        .into_inner()
}

/// The refusal of a watch: at the call, or as the stream's first message.
async fn refusal(client: &mut KeysClient, request: pb::WatchKeyEventsRequest) -> tonic::Status {
    match client.watch_key_events(request).await {
        Err(status) => status,
        Ok(response) => {
            let mut events = response.into_inner();
            tokio::time::timeout(PATIENCE, events.message())
                .await
                .expect("an answer in time")
                .expect_err("the watch is refused")
        }
    }
}

/// The next event; panics if none comes in time or the stream ends.
async fn next(events: &mut Events) -> pb::KeyEvent {
    tokio::time::timeout(PATIENCE, events.message())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("an event, not the end of the stream")
        .event
        .expect("a response holds an event")
}

async fn take(events: &mut Events, count: usize) -> Vec<pb::KeyEvent> {
    let mut taken = Vec::with_capacity(count);
    for _ in 0..count {
        taken.push(next(events).await);
    }
    taken
}

/// The events up to and including the first of `key_id` of type `event_type`.
async fn until(events: &mut Events, event_type: &str, key_id: &str) -> Vec<pb::KeyEvent> {
    let mut seen = Vec::new();
    loop {
        let event = next(events).await;
        let last = event.r#type == event_type && event.key_id == key_id;
        seen.push(event);
        if last {
            return seen;
        }
    }
}

/// Issues a key in `workspace_id` and returns its id: a marker that the events before it came
/// first (positions commit in order).
async fn marker(app: &mut TestApp, workspace_id: &str) -> String {
    key_of(&app.issue(workspace_id, "marker").await)
        .key_id
        .clone()
}

/// (position, event id, type, workspace, key): what the database holds, or what a watcher got.
type Summary = (i64, String, String, String, String);

fn summary(event: &pb::KeyEvent) -> Summary {
    (
        event.position,
        event.event_id.clone(),
        event.r#type.clone(),
        event.workspace_id.clone(),
        event.key_id.clone(),
    )
}

fn summaries(events: &[pb::KeyEvent]) -> Vec<Summary> {
    events.iter().map(summary).collect()
}

fn types(events: &[pb::KeyEvent]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|event| (event.r#type.as_str(), event.key_id.as_str()))
        .collect()
}

/// Every event the database holds, in position order.
async fn stored_events(db: &TestDb) -> Vec<Summary> {
    query_rows(
        db,
        "select position, event_id, event_type, workspace_id, key_id \
         from key_event order by position",
    )
    .await
}

/// The highest position the pruning has deleted.
async fn pruned_through(db: &TestDb) -> i64 {
    query_value(
        db,
        "select through_position from key_event_pruned where id = 1",
    )
    .await
}

/// Waits (bounded) until the pruning has deleted every event up to `position`: it runs on its
/// own schedule, with no signal to await.
async fn await_pruned_through(db: &TestDb, position: i64) -> i64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pruned = pruned_through(db).await;
        if pruned >= position {
            return pruned;
        }
        assert!(Instant::now() < deadline, "pruned through {pruned} only");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Positions strictly increasing, event ids unique.
fn assert_ordered_and_unique(events: &[pb::KeyEvent]) {
    assert!(
        events
            .windows(2)
            .all(|pair| pair[0].position < pair[1].position),
        "positions strictly increase: {:?}",
        events
            .iter()
            .map(|event| event.position)
            .collect::<Vec<_>>()
    );
    let ids: HashSet<&str> = events.iter().map(|event| event.event_id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
}

fn admin_actor() -> pb::AuditActor {
    pb::AuditActor {
        kind: pb::ActorKind::Admin as i32,
        id: "admin".into(),
        display: "admin".into(),
    }
}

fn system_actor(id: &str) -> pb::AuditActor {
    pb::AuditActor {
        kind: pb::ActorKind::System as i32,
        id: id.into(),
        display: format!("system: {id}"),
    }
}

/// The change of `field` in `event`, as (old, new) JSON texts.
fn change<'a>(event: &'a pb::KeyEvent, field: &str) -> Option<(&'a str, &'a str)> {
    event
        .changes
        .iter()
        .find(|change| change.field == field)
        .map(|change| (change.old_value.as_str(), change.new_value.as_str()))
}

fn update(key_id: &str, key: pb::Key, paths: &[&str]) -> pb::UpdateKeyRequest {
    pb::UpdateKeyRequest {
        key: Some(pb::Key {
            key_id: key_id.to_owned(),
            workspace_id: "acme".into(),
            ..key
        }),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

fn seconds(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

/// A key of acme that expires after `ttl`.
async fn issue_expiring(app: &mut TestApp, name: &str, ttl: prost_types::Duration) -> pb::Key {
    key_of(
        &app.issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: name.into(),
            expiration: Some(pb::issue_key_request::Expiration::Ttl(ttl)),
            ..Default::default()
        })
        .await,
    )
    .clone()
}

/// Neither a secret nor its private part appears in any event, as text or on the wire.
fn assert_no_secret(events: &[pb::KeyEvent], secrets: &[(String, String)]) {
    for event in events {
        let text = format!("{event:?}");
        let wire = pb::WatchKeyEventsResponse {
            event: Some(event.clone()),
        }
        .encode_to_vec();
        for (prefix, secret) in secrets {
            let private = secret
                .strip_prefix(prefix.as_str())
                .expect("a secret starts with its prefix");
            for needle in [secret.as_str(), private] {
                assert!(!text.contains(needle), "a secret in {event:?}");
                assert!(
                    !wire
                        .windows(needle.len())
                        .any(|window| window == needle.as_bytes()),
                    "a secret on the wire in {event:?}"
                );
            }
        }
    }
}

async fn each_mutation_announces_its_event(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut secrets = Vec::new();

    // IssueKey.
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "ci".into(),
            scopes: vec!["deploy".into()],
            ..Default::default()
        })
        .await;
    let key_id = key_of(&issued).key_id.clone();
    secrets.push((key_of(&issued).prefix.clone(), issued.secret.clone()));
    // RotateKey with a grace period: the old key now ends at its end.
    let rotated = app
        .rotate("acme", &key_id, Some(seconds(3600)))
        .await
        .unwrap();
    let successor = rotated.key.clone().unwrap();
    let previous = rotated.previous_key.clone().unwrap();
    secrets.push((successor.prefix.clone(), rotated.secret.clone()));
    // A second rotation of the same key fails: nothing to announce.
    let again = app
        .rotate("acme", &key_id, Some(seconds(3600)))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    // UpdateKey, then disable and enable through it.
    let renamed = app
        .keys
        .update_key(update(
            &successor.key_id,
            pb::Key {
                name: "ci v2".into(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    for enabled in [false, true] {
        app.keys
            .update_key(update(
                &successor.key_id,
                pb::Key {
                    enabled,
                    ..Default::default()
                },
                &["enabled"],
            ))
            .await
            .unwrap();
    }
    // An update that changes nothing, and one with a stale etag: nothing to announce.
    app.keys
        .update_key(update(
            &successor.key_id,
            pb::Key {
                name: "ci v2".into(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap();
    let stale = app
        .keys
        .update_key(update(
            &successor.key_id,
            pb::Key {
                name: "late".into(),
                etag: renamed.etag.clone(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    // RevokeKey of the old key with its successors: one event per key revoked.
    app.keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: key_id.clone(),
            revoke_successors: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Revoking a revoked key changes nothing.
    app.revoke("acme", &key_id).await.unwrap();
    // Trial keys, by an anonymous caller.
    let mut anonymous = keys_as(&app.channel, None);
    let trial = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    let trial_key = trial.key.clone().unwrap();
    secrets.push((trial_key.prefix.clone(), trial.secret.clone()));
    anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: trial_key.prefix.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = marker(&mut app, "acme").await;

    let mut watch = watch(&mut app.keys, everything_after(0)).await;
    let events = until(&mut watch, "key.issued", &last).await;
    let s = successor.key_id.as_str();
    let t = trial_key.key_id.as_str();
    assert_eq!(
        types(&events),
        [
            ("key.issued", key_id.as_str()),
            ("key.rotated", key_id.as_str()),
            ("key.updated", s),
            ("key.disabled", s),
            ("key.enabled", s),
            ("key.revoked", key_id.as_str()),
            ("key.revoked", s),
            ("key.issued", t),
            ("key.revoked", t),
            ("key.issued", last.as_str()),
        ],
        "one event per change, none for a failed or unchanged call"
    );
    assert_ordered_and_unique(&events);
    assert_no_secret(&events, &secrets);
    let [
        issue,
        rotate,
        rename,
        disable,
        enable,
        revoke,
        revoke_successor,
        trial_issue,
        trial_revoke,
        _,
    ] = &events[..]
    else {
        unreachable!()
    };
    for event in &events[..7] {
        assert_eq!(event.workspace_id, "acme");
        assert_eq!(event.actor, Some(admin_actor()));
        assert!(event.event_time.is_some());
    }
    assert_eq!(change(issue, "name"), Some(("null", "\"ci\"")));
    assert_eq!(change(issue, "scopes"), Some(("null", "[\"deploy\"]")));
    // key.rotated: the old key, its successor, and when the old key now stops working.
    assert_eq!(rotate.new_key_id, successor.key_id);
    assert!(previous.expire_time.is_some());
    assert_eq!(rotate.old_key_expire_time, previous.expire_time);
    assert_eq!(
        change(rotate, "rotated_to_key_id"),
        Some(("null", format!("\"{s}\"").as_str()))
    );
    assert_eq!(
        events
            .iter()
            .filter(|event| event.r#type == "key.rotated")
            .count(),
        1,
        "key.rotated once per rotation"
    );
    for event in events.iter().filter(|event| event.r#type != "key.rotated") {
        assert_eq!(event.new_key_id, "");
        assert_eq!(event.old_key_expire_time, None);
    }
    assert_eq!(change(rename, "name"), Some(("\"ci\"", "\"ci v2\"")));
    assert_eq!(rename.changes.len(), 1, "only what changed");
    assert_eq!(change(disable, "enabled"), Some(("true", "false")));
    assert_eq!(change(enable, "enabled"), Some(("false", "true")));
    for event in [revoke, revoke_successor] {
        assert_eq!(change(event, "revoked_by"), Some(("null", "\"admin\"")));
    }
    let anonymous_actor = pb::AuditActor {
        kind: pb::ActorKind::Anonymous as i32,
        id: "127.0.0.1".into(),
        display: "anonymous (127.0.0.1)".into(),
    };
    for event in [trial_issue, trial_revoke] {
        assert_eq!(event.workspace_id, "trial");
        assert_eq!(event.actor.as_ref(), Some(&anonymous_actor));
    }
    // The watcher saw exactly what the database holds.
    assert_eq!(summaries(&events), stored_events(&db).await);
    drop(watch);
    app.stop().await;
}

async fn a_lockout_is_announced_behind(db: TestDb) {
    let mut config = test_config(&db);
    config.verify.lockout.key_failures = 3;
    let mut app = TestApp::spawn_with(config).await;
    let victim = key_of(&app.issue("acme", "victim").await).clone();
    let mut watch = watch(&mut app.keys, acme_from_now()).await;
    for n in 1..=8 {
        app.verify
            .verify_key(pb::VerifyKeyRequest {
                key: forge_numbered(&victim.prefix, n),
                // The address of the guess that engages the lockout; IP lockouts are not tested here.
                client_ip: if n <= 3 {
                    "198.51.100.9".into()
                } else {
                    String::new()
                },
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Written behind VerifyKey: awaited on the stream.
    let locked = next(&mut watch).await;
    assert_eq!(
        (locked.r#type.as_str(), locked.key_id.as_str()),
        ("key.locked", victim.key_id.as_str())
    );
    assert_eq!(locked.actor, Some(system_actor("lockout")));
    // The guesses while locked engaged nothing new.
    let last = marker(&mut app, "acme").await;
    let rest = until(&mut watch, "key.issued", &last).await;
    assert_eq!(rest.len(), 1, "one lockout, one event: {rest:?}");
    drop(watch);
    app.stop().await;
}

async fn each_expiry_is_announced_once(db: TestDb) {
    let mut config = test_config(&db);
    config.events.expiry_sweep_interval = Duration::from_millis(50);
    let mut app = TestApp::spawn_with(config).await;
    let mut watch = watch(&mut app.keys, acme_from_now()).await;
    let first = issue_expiring(&mut app, "first", seconds(1)).await;
    let revoked = issue_expiring(&mut app, "revoked before its end", seconds(1)).await;
    app.revoke("acme", &revoked.key_id).await.unwrap();
    let second = issue_expiring(&mut app, "second", seconds(2)).await;

    let events = until(&mut watch, "key.expired", &second.key_id).await;
    let expired: Vec<&pb::KeyEvent> = events
        .iter()
        .filter(|event| event.r#type == "key.expired")
        .collect();
    assert_eq!(
        expired
            .iter()
            .map(|event| event.key_id.as_str())
            .collect::<Vec<_>>(),
        [first.key_id.as_str(), second.key_id.as_str()],
        "once each, in the order they ended; none for the key revoked first"
    );
    for (event, key) in expired.iter().zip([&first, &second]) {
        assert_eq!(event.event_time, key.expire_time, "at the key's end");
        assert_eq!(event.actor, Some(system_actor("expiry")));
        assert!(event.changes.is_empty());
    }
    // A third key ends a second later: the many sweeps meanwhile announce nothing again.
    let third = issue_expiring(&mut app, "third", seconds(1)).await;
    let rest = until(&mut watch, "key.expired", &third.key_id).await;
    assert_eq!(
        types(&rest),
        [
            ("key.issued", third.key_id.as_str()),
            ("key.expired", third.key_id.as_str())
        ]
    );
    drop(watch);
    app.stop().await;
}

async fn a_watch_replays_the_stored_events_then_follows(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let one = marker(&mut app, "acme").await;
    let two = marker(&mut app, "acme").await;
    let mut from_start = watch(&mut app.keys, acme_after(0)).await;
    let stored = take(&mut from_start, 2).await;
    assert_eq!(
        types(&stored),
        [("key.issued", one.as_str()), ("key.issued", two.as_str())]
    );
    // Live: a key issued after subscribing arrives.
    let three = marker(&mut app, "acme").await;
    assert_eq!(next(&mut from_start).await.key_id, three);

    // From now: only what commits after the watch starts, which it names.
    let response = app.keys.watch_key_events(acme_from_now()).await.unwrap();
    let starts_after = response.metadata().get("key-authority-starts-after");
    assert_eq!(
        starts_after.and_then(|value| value.to_str().ok()),
        Some(
            stored_events(&db)
                .await
                .last()
                .unwrap()
                .0
                .to_string()
                .as_str()
        )
    );
    let mut from_now = response.into_inner();
    let four = marker(&mut app, "acme").await;
    let first_new = next(&mut from_now).await;
    assert_eq!(
        (first_new.r#type.as_str(), first_new.key_id.as_str()),
        ("key.issued", four.as_str())
    );
    assert_eq!(next(&mut from_start).await.key_id, four);
    // After a position: what follows it.
    let mut after_two = watch(&mut app.keys, acme_after(stored[1].position)).await;
    let replayed = take(&mut after_two, 2).await;
    assert_eq!(
        replayed
            .iter()
            .map(|event| event.key_id.as_str())
            .collect::<Vec<_>>(),
        [three.as_str(), four.as_str()]
    );
    drop((from_start, from_now, after_two));
    app.stop().await;
}

/// One replica on SQLite (one node); two on PostgreSQL.
async fn replicas(db: &TestDb) -> Vec<TestApp> {
    let count = match db.backend {
        Backend::Sqlite => 1,
        Backend::Postgres => 2,
    };
    let mut apps = Vec::new();
    for _ in 0..count {
        apps.push(TestApp::spawn(db).await);
    }
    apps
}

/// A watcher that drops its stream every few events and reconnects with the last position it
/// got, alternating between the replicas, while keys are issued on all of them: what it got is
/// exactly what the database holds, in order.
async fn a_reconnect_with_the_last_position_misses_nothing(db: TestDb) {
    let mut apps = replicas(&db).await;
    const KEYS: usize = 60;
    // How many keys the writer has issued.
    let (issued_tx, mut issued) = tokio::sync::watch::channel(0usize);
    let writers: Vec<KeysClient> = apps.iter().map(|app| app.keys.clone()).collect();
    let writer = tokio::spawn(async move {
        for n in 0..KEYS {
            let mut client = writers[n % writers.len()].clone();
            client
                .issue_key(pb::IssueKeyRequest {
                    workspace_id: "acme".into(),
                    name: format!("key {n}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            issued_tx.send_replace(n + 1);
        }
    });

    let mut got = Vec::new();
    let mut last_position = 0;
    let mut connection = 0;
    while got.len() < KEYS {
        let replica = connection % apps.len();
        connection += 1;
        let mut watch = watch(&mut apps[replica].keys, acme_after(last_position)).await;
        let wanted = (KEYS - got.len()).min(7);
        let events = take(&mut watch, wanted).await;
        last_position = events.last().unwrap().position;
        got.extend(events);
        drop(watch);
        // Disconnected: wait until a key was issued by a call that started after the
        // disconnect (the writer's second call from now), unless the writer is done.
        let at_disconnect = *issued.borrow_and_update();
        let _ = issued
            .wait_for(|&count| count >= (at_disconnect + 2).min(KEYS))
            .await;
    }
    writer.await.unwrap();
    assert!(connection > 5, "the watcher reconnected many times");
    assert_ordered_and_unique(&got);
    assert_eq!(
        summaries(&got),
        stored_events(&db).await,
        "each once, in order"
    );
    for app in apps {
        app.stop().await;
    }
}

/// Mutations of every kind, concurrently on every replica (some retried with the same request id
/// on both), while watchers of every replica read: each sees exactly the events the database
/// holds, each once, in position order. On PostgreSQL, every event-writing transaction of both
/// replicas takes the one ordering lock, then claims its request id: none may deadlock.
async fn concurrent_mutations_reach_every_watcher_in_order(db: TestDb) {
    let mut apps = replicas(&db).await;
    let start = stored_events(&db).await.len();
    assert_eq!(start, 0);
    let mut watchers = Vec::new();
    for app in &mut apps {
        watchers.push(watch(&mut app.keys, everything_after(0)).await);
    }
    const TASKS: usize = 3;
    const ROUNDS: usize = 6;
    let mut tasks = Vec::new();
    for (replica, app) in apps.iter().enumerate() {
        for task in 0..TASKS {
            let mut client = app.keys.clone();
            tasks.push(tokio::spawn(async move {
                let workspace = if task % 2 == 0 { "acme" } else { "beta" };
                for round in 0..ROUNDS {
                    // The same request id on every replica: one key, one event.
                    let request_id = format!("00000000-0000-4000-8000-{:06}{:06}", task, round);
                    let issued = client
                        .issue_key(pb::IssueKeyRequest {
                            workspace_id: workspace.into(),
                            name: format!("task {task} round {round}"),
                            request_id,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let key_id = issued.key.unwrap().key_id;
                    // The replicas race for the same key from here; a loser is told so.
                    let rotated = client
                        .rotate_key(pb::RotateKeyRequest {
                            workspace_id: workspace.into(),
                            key_id: key_id.clone(),
                            grace_period: Some(seconds(60)),
                            ..Default::default()
                        })
                        .await;
                    if let Err(status) = &rotated {
                        assert!(
                            matches!(status.code(), Code::FailedPrecondition | Code::Aborted),
                            "replica {replica}: {status:?}"
                        );
                    }
                    let revoked = client
                        .revoke_key(pb::RevokeKeyRequest {
                            workspace_id: workspace.into(),
                            key_id,
                            revoke_successors: true,
                            ..Default::default()
                        })
                        .await;
                    assert!(revoked.is_ok(), "replica {replica}: {revoked:?}");
                }
            }));
        }
    }
    for task in tasks {
        tokio::time::timeout(PATIENCE * 3, task)
            .await
            .expect("no mutation waits forever")
            .unwrap();
    }
    let last = marker(&mut apps[0], "acme").await;
    let stored = stored_events(&db).await;
    for (replica, watcher) in watchers.iter_mut().enumerate() {
        let seen = until(watcher, "key.issued", &last).await;
        assert_ordered_and_unique(&seen);
        assert_eq!(summaries(&seen), stored, "replica {replica}'s watcher");
    }
    let issued = stored
        .iter()
        .filter(|event| event.2 == "key.issued")
        .count();
    assert_eq!(issued, TASKS * ROUNDS + 1, "one key per request id");
    drop(watchers);
    for app in apps {
        app.stop().await;
    }
}

/// A reader that does not read while hundreds of events are written (the server buffers a few,
/// the rest wait in the outbox), then reads: every one, in order.
async fn a_slow_reader_still_gets_every_event_in_order(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut watch = watch(&mut app.keys, acme_after(0)).await;
    const KEYS: usize = 220;
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut client = app.keys.clone();
        writers.push(tokio::spawn(async move {
            for n in (writer..KEYS).step_by(4) {
                client
                    .issue_key(pb::IssueKeyRequest {
                        workspace_id: "acme".into(),
                        name: format!("key {n}"),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let events = take(&mut watch, KEYS).await;
    assert_ordered_and_unique(&events);
    assert_eq!(summaries(&events), stored_events(&db).await);
    // And it follows on live.
    let last = marker(&mut app, "acme").await;
    assert_eq!(next(&mut watch).await.key_id, last);
    drop(watch);
    app.stop().await;
}

async fn each_workspace_watches_only_its_own_events(db: TestDb) {
    let mut app = TestApp::spawn_with(with_dashboard_jwts(test_config(&db))).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(marker(&mut app, "acme").await);
        keys.push(marker(&mut app, "beta").await);
    }
    let last = marker(&mut app, "acme").await;

    // A user of acme, naming no workspace: acme's events only.
    let mut viewer = keys_as(&app.channel, Some(&jwt_user("acme", "viewer")));
    let mut own = watch(&mut viewer, pb::WatchKeyEventsRequest::default()).await;
    let seen = until(&mut own, "key.issued", &last).await;
    assert_eq!(
        seen.iter()
            .map(|event| event.key_id.as_str())
            .collect::<Vec<_>>(),
        [
            keys[0].as_str(),
            keys[2].as_str(),
            keys[4].as_str(),
            last.as_str()
        ]
    );
    assert!(seen.iter().all(|event| event.workspace_id == "acme"));
    // Live too: beta's next event never reaches it, acme's does.
    marker(&mut app, "beta").await;
    let acme_next = marker(&mut app, "acme").await;
    assert_eq!(next(&mut own).await.key_id, acme_next);

    // Naming another workspace is refused.
    let status = refusal(
        &mut viewer,
        pb::WatchKeyEventsRequest {
            workspace_id: "beta".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "WORKSPACE_MISMATCH");
    // Every workspace: admins only, and without naming one.
    let status = refusal(&mut viewer, everything_after(0)).await;
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut admin_all = watch(&mut app.keys, everything_after(0)).await;
    let all = until(&mut admin_all, "key.issued", &acme_next).await;
    assert_eq!(all.len(), 9, "both workspaces: {:?}", types(&all));
    assert_eq!(summaries(&all), stored_events(&db).await);
    let status = refusal(
        &mut app.keys,
        pb::WatchKeyEventsRequest {
            workspace_id: "acme".into(),
            ..everything_after(0)
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    // A position before the first is invalid; so is naming no workspace as an admin.
    let status = refusal(&mut app.keys, acme_after(-1)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = refusal(&mut app.keys, pb::WatchKeyEventsRequest::default()).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    // No credentials, no events.
    let status = refusal(&mut keys_as(&app.channel, None), acme_after(0)).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    drop((own, admin_all));
    app.stop().await;
}

/// Events past the retention are pruned: a watch from before them is OUT_OF_RANGE naming where
/// to resume. Watchers that keep up are never told so, whatever the pruning deletes around them:
/// one of acme while beta's events are pruned, and one from now when every event is gone.
async fn pruned_events_are_out_of_range(db: TestDb) {
    let mut config = test_config(&db);
    config.events.retention = Duration::from_millis(300);
    config.audit.prune_interval = Duration::from_millis(20);
    let mut app = TestApp::spawn_with(config).await;
    let first = marker(&mut app, "acme").await;
    let mut acme = watch(&mut app.keys, acme_from_now()).await;
    let mut everything = watch(
        &mut app.keys,
        pb::WatchKeyEventsRequest {
            from_now: true,
            all_workspaces: true,
            ..Default::default()
        },
    )
    .await;
    marker(&mut app, "beta").await;
    let beta = next(&mut everything).await;
    // Every event so far is pruned, beta's included.
    let pruned = await_pruned_through(&db, beta.position).await;
    assert!(stored_events(&db).await.is_empty());

    let status = refusal(&mut app.keys, acme_after(0)).await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status), "EVENTS_PRUNED");
    assert!(
        status
            .message()
            .contains(&format!("position {}", pruned + 1)),
        "names the oldest position kept: {}",
        status.message()
    );
    let info = {
        use tonic_types::StatusExt as _;
        status.get_details_error_info().expect("ErrorInfo")
    };
    assert_eq!(
        info.metadata.get("oldest_kept_position"),
        Some(&(pruned + 1).to_string())
    );
    assert_eq!(
        info.metadata.get("after_position"),
        Some(&pruned.to_string())
    );
    // From there on, and from now, watches work; the watchers that kept up go on.
    let mut resumed = watch(&mut app.keys, acme_after(pruned)).await;
    let mut from_now = watch(&mut app.keys, acme_from_now()).await;
    let second = marker(&mut app, "acme").await;
    for watch in [&mut acme, &mut everything, &mut resumed, &mut from_now] {
        let event = next(watch).await;
        assert_eq!(
            (event.r#type.as_str(), event.key_id.as_str()),
            ("key.issued", second.as_str())
        );
    }
    assert_ne!(first, second);
    drop((acme, everything, resumed, from_now));
    app.stop().await;
}

/// Graceful shutdown ends open watches at once: the stream ends, and draining does not wait for
/// the grace period.
async fn shutdown_ends_open_watches(db: TestDb) {
    let mut config = test_config(&db);
    config.shutdown_grace = Duration::from_secs(60);
    let mut app = TestApp::spawn_with(config).await;
    let issued = marker(&mut app, "acme").await;
    let mut watch = watch(&mut app.keys, acme_after(0)).await;
    assert_eq!(next(&mut watch).await.key_id, issued);
    let reader = tokio::spawn(async move { watch.message().await });

    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), app.stop())
        .await
        .expect("the shutdown does not wait for the watch");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "stopped in {elapsed:?}");
    let end = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the stream ended")
        .unwrap();
    assert!(matches!(end, Ok(None)), "the stream ended cleanly: {end:?}");
}

/// The position a watch starts after is in a response header: a watch opened `from_now` that ends
/// before its first event resumes from there and misses nothing.
async fn a_watch_names_where_it_starts(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    marker(&mut app, "acme").await;
    let starts_after = |response: &tonic::Response<Events>| -> i64 {
        response
            .metadata()
            .get("key-authority-starts-after")
            .expect("the header")
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let stored = stored_events(&db).await.len() as i64;
    let from_now = app.keys.watch_key_events(acme_from_now()).await.unwrap();
    let resume_after = starts_after(&from_now);
    assert!(resume_after >= stored, "after every stored event");
    drop(from_now);
    // Committed while nobody watched: a resume from the header's position gets it.
    let missed = marker(&mut app, "acme").await;
    let resumed = app
        .keys
        .watch_key_events(acme_after(resume_after))
        .await
        .unwrap();
    assert_eq!(starts_after(&resumed), resume_after);
    let mut events = resumed.into_inner();
    assert_eq!(next(&mut events).await.key_id, missed);
    app.stop().await;
}

/// A watch opened by an API key ends when that key is revoked or disabled, as every other call
/// of the key would be refused at once; events about other keys do not end it.
async fn a_watch_ends_with_the_api_key_that_opened_it(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    for ending in ["revoke", "disable"] {
        let watcher = app
            .issue_with(pb::IssueKeyRequest {
                workspace_id: "acme".into(),
                name: format!("watcher until {ending}"),
                role: pb::Role::Viewer as i32,
                ..Default::default()
            })
            .await;
        let watcher_id = key_of(&watcher).key_id.clone();
        let mut events = watch(
            &mut keys_as(&app.channel, Some(&watcher.secret)),
            pb::WatchKeyEventsRequest {
                from_now: true,
                ..Default::default()
            },
        )
        .await;
        let other = marker(&mut app, "acme").await;
        assert_eq!(next(&mut events).await.key_id, other);
        if ending == "revoke" {
            app.revoke("acme", &watcher_id).await.unwrap();
        } else {
            app.keys
                .update_key(update(
                    &watcher_id,
                    pb::Key {
                        enabled: false,
                        ..Default::default()
                    },
                    &["enabled"],
                ))
                .await
                .unwrap();
        }
        let last = next(&mut events).await;
        assert_eq!(last.key_id, watcher_id);
        let status = tokio::time::timeout(PATIENCE, events.message())
            .await
            .expect("an answer in time")
            .expect_err("the watch ends");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{ending}");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    }
    app.stop().await;
}

/// Watches are capped per replica: one more is refused at once (and a closed one frees its
/// place), so opening watches on many connections cannot pile up tasks without bound.
async fn watches_are_capped_per_replica(db: TestDb) {
    let mut config = test_config(&db);
    config.events.max_watchers = 1;
    let mut app = TestApp::spawn_with(config).await;
    let first = watch(&mut app.keys, acme_from_now()).await;
    let status = refusal(&mut app.keys, acme_from_now()).await;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&status), "OVERLOADED");
    drop(first);
    // The closed watch's task notices its reader is gone and gives its place back.
    let deadline = Instant::now() + PATIENCE;
    let mut again = loop {
        match app.keys.watch_key_events(acme_from_now()).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                assert_eq!(reason(&status), "OVERLOADED");
                assert!(Instant::now() < deadline, "the place was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let key_id = marker(&mut app, "acme").await;
    assert_eq!(next(&mut again).await.key_id, key_id);
    drop(again);
    app.stop().await;
}

on_both_databases!(
    watches_are_capped_per_replica,
    a_watch_ends_with_the_api_key_that_opened_it,
    a_watch_names_where_it_starts,
    each_mutation_announces_its_event,
    a_lockout_is_announced_behind,
    each_expiry_is_announced_once,
    a_watch_replays_the_stored_events_then_follows,
    a_reconnect_with_the_last_position_misses_nothing,
    concurrent_mutations_reach_every_watcher_in_order,
    a_slow_reader_still_gets_every_event_in_order,
    each_workspace_watches_only_its_own_events,
    pruned_events_are_out_of_range,
    shutdown_ends_open_watches,
);

/// An event committed on one replica reaches a watcher on the other, through NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_one_replica_reaches_a_watcher_on_the_other() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = TestApp::spawn(&db).await;
    let mut b = TestApp::spawn(&db).await;
    let mut on_b = watch(&mut b.keys, acme_from_now()).await;
    for _ in 0..5 {
        let issued = marker(&mut a, "acme").await;
        let event = next(&mut on_b).await;
        assert_eq!(
            (event.r#type.as_str(), event.key_id.as_str()),
            ("key.issued", issued.as_str())
        );
    }
    drop(on_b);
    a.stop().await;
    b.stop().await;
}
