//! Safe retries: a mutation with a request id (field or `idempotency-key` header) is done once
//! per caller; its retries get the same answer, the same secret included, and change nothing.

use std::time::Duration;

use key_authority::pb;
use tonic::Code;

use crate::common::{
    Backend, Claims, KeysClient, TestApp, TestDb, audit_events, claims, code, hs256, key_of,
    keys_as, on_both_databases, query_value, reason, test_config, with_dashboard_jwts,
};

const REQUEST_ID: &str = "6f1c2a9e-3b7d-4c55-9a0e-2f4b8d1e7c30";
const OTHER_REQUEST_ID: &str = "0b8e4f2a-91c3-4d6e-8f17-5a2c9e3d4b61";

/// A developer of workspace acme, as a dashboard JWT.
fn developer(subject: &str) -> String {
    hs256(&Claims {
        sub: subject,
        ..claims("acme", "developer")
    })
}

/// A server that also accepts dashboard JWTs, with the given idempotency window.
async fn spawn_with_window(db: &TestDb, window: Duration) -> TestApp {
    let mut config = with_dashboard_jwts(test_config(db));
    config.idempotency.window = window;
    TestApp::spawn_with(config).await
}

async fn spawn(db: &TestDb) -> TestApp {
    spawn_with_window(db, Duration::from_secs(24 * 60 * 60)).await
}

fn issue_request(name: &str, request_id: &str) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        workspace_id: "acme".into(),
        name: name.into(),
        scopes: vec!["read".into()],
        metadata: [("team".to_owned(), "payments".to_owned())].into(),
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// Every key of the workspace, revoked and expired ones included.
async fn key_count(client: &mut KeysClient, workspace_id: &str) -> i64 {
    client
        .list_keys(pb::ListKeysRequest {
            workspace_id: workspace_id.into(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_size
}

/// The request claims in the database.
async fn claim_count(db: &TestDb) -> i64 {
    query_value(db, "select count(*) from idempotent_request").await
}

fn with_header<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("idempotency-key", request_id.parse().unwrap());
    request
}

async fn issue_key_is_replayed(db: TestDb) {
    let mut app = spawn(&db).await;
    let first = app.issue_with(issue_request("ci", REQUEST_ID)).await;
    let retry = app.issue_with(issue_request("ci", REQUEST_ID)).await;

    assert_eq!(retry, first, "the same key and the same secret");
    assert_eq!(key_count(&mut app.keys, "acme").await, 1);
    assert_eq!(audit_events(&db).await.len(), 1);
    assert_eq!(
        code(&app.verify_key(&retry.secret, &["read"]).await),
        pb::VerifyCode::Valid
    );
    // The request id is on the one event.
    let events = app
        .keys
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].request_id, REQUEST_ID);
    app.stop().await;
}

async fn rotate_key_is_replayed(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue("acme", "rotated").await;
    let rotate = pb::RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: key_of(&issued).key_id.clone(),
        grace_period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        request_id: REQUEST_ID.into(),
        ..Default::default()
    };
    let first = app
        .keys
        .rotate_key(rotate.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = app.keys.rotate_key(rotate).await.unwrap().into_inner();

    assert_eq!(retry, first, "the same successor, secret and previous key");
    assert_eq!(
        retry.previous_key.as_ref().unwrap().key_id,
        key_of(&issued).key_id
    );
    assert_eq!(key_count(&mut app.keys, "acme").await, 2);
    let actions: Vec<String> = audit_events(&db)
        .await
        .into_iter()
        .map(|(_, action, _)| action)
        .collect();
    assert_eq!(actions, ["issue", "rotate"]);
    assert_eq!(
        code(&app.verify_key(&retry.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn revoke_key_is_replayed(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue("acme", "leaked").await;
    let key_id = key_of(&issued).key_id.clone();
    let rotated = app.rotate("acme", &key_id, None).await.unwrap();
    let revoke = pb::RevokeKeyRequest {
        workspace_id: "acme".into(),
        key_id: key_id.clone(),
        revoke_successors: true,
        request_id: REQUEST_ID.into(),
    };
    let first = app
        .keys
        .revoke_key(revoke.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = app.keys.revoke_key(revoke).await.unwrap().into_inner();

    assert_eq!(retry, first, "the key and its successors as they are");
    assert_eq!(retry.successors.len(), 1);
    assert_eq!(
        retry.successors[0].key_id,
        rotated.key.as_ref().unwrap().key_id
    );
    // Without the request id the retry would have left an UNCHANGED event of its own.
    let actions: Vec<String> = audit_events(&db)
        .await
        .into_iter()
        .map(|(_, action, _)| action)
        .collect();
    assert_eq!(actions, ["issue", "rotate", "revoke", "revoke"]);
    app.stop().await;
}

async fn update_key_is_replayed(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue("acme", "before").await;
    let key = key_of(&issued).clone();
    let update = |name: &str, request_id: &str| pb::UpdateKeyRequest {
        key: Some(pb::Key {
            name: name.into(),
            ..key.clone()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name".into()],
        }),
        request_id: request_id.into(),
    };
    let first = app
        .keys
        .update_key(update("after", REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    // The retry carries the etag the first call read: the key has moved past it since, and the
    // retry is answered anyway (the etag is the first call's precondition, not part of it).
    let retry = app
        .keys
        .update_key(update("after", REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(retry.key.as_ref().unwrap().name, "after");
    assert_eq!(audit_events(&db).await.len(), 2, "issue and one update");

    // An update that changes nothing is claimed too: its one UNCHANGED event is not repeated.
    let current = retry.key.unwrap();
    let unchanged = pb::UpdateKeyRequest {
        key: Some(current.clone()),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name".into()],
        }),
        request_id: OTHER_REQUEST_ID.into(),
    };
    let first = app.keys.update_key(unchanged.clone()).await.unwrap();
    let retry = app.keys.update_key(unchanged).await.unwrap();
    assert_eq!(retry.into_inner(), first.into_inner());
    assert_eq!(audit_events(&db).await.len(), 3);
    app.stop().await;
}

async fn issue_trial_key_is_replayed(db: TestDb) {
    let mut config = test_config(&db);
    // One trial key per address per minute: the retry must not spend a second.
    config.auth.trial_limit_per_minute = 1;
    let mut app = TestApp::spawn_with(config).await;
    let request = pb::IssueTrialKeyRequest {
        name: "playground".into(),
        request_id: REQUEST_ID.into(),
        ..Default::default()
    };
    let first = app
        .keys
        .issue_trial_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = app
        .keys
        .issue_trial_key(request)
        .await
        .expect("a replay spends no rate limit")
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(key_count(&mut app.keys, "trial").await, 1);
    assert_eq!(audit_events(&db).await.len(), 1);
    assert_eq!(
        code(&app.verify_key(&retry.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    // Another request from the same address is rate limited as before.
    let other = app
        .keys
        .issue_trial_key(pb::IssueTrialKeyRequest {
            name: "playground".into(),
            request_id: OTHER_REQUEST_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::ResourceExhausted);
    app.stop().await;
}

async fn a_request_id_reused_for_another_request_is_refused(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue_with(issue_request("ci", REQUEST_ID)).await;

    let other_name = app
        .keys
        .issue_key(issue_request("another name", REQUEST_ID))
        .await
        .unwrap_err();
    assert_eq!(other_name.code(), Code::FailedPrecondition);
    assert_eq!(reason(&other_name), "IDEMPOTENCY_KEY_REUSED");

    let mut other_scopes = issue_request("ci", REQUEST_ID);
    other_scopes.scopes = vec!["write".into()];
    let status = app.keys.issue_key(other_scopes).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");

    // The same id on another RPC is another request too.
    let revoke = app
        .keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: key_of(&issued).key_id.clone(),
            request_id: REQUEST_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(revoke.code(), Code::FailedPrecondition);
    assert_eq!(reason(&revoke), "IDEMPOTENCY_KEY_REUSED");

    // Nothing happened: one key, still active, one event.
    assert_eq!(key_count(&mut app.keys, "acme").await, 1);
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(audit_events(&db).await.len(), 1);
    app.stop().await;
}

async fn the_header_works_like_the_field(db: TestDb) {
    let mut app = spawn(&db).await;
    let by_header = app
        .keys
        .issue_key(with_header(issue_request("ci", ""), REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    // The same id in the field, spelt in capitals: the same request.
    let by_field = app
        .issue_with(issue_request("ci", &REQUEST_ID.to_uppercase()))
        .await;
    assert_eq!(by_field, by_header);
    // Both, agreeing: the same request again.
    let both = app
        .keys
        .issue_key(with_header(issue_request("ci", REQUEST_ID), REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both, by_header);
    assert_eq!(key_count(&mut app.keys, "acme").await, 1);

    let disagreeing = app
        .keys
        .issue_key(with_header(
            issue_request("ci", REQUEST_ID),
            OTHER_REQUEST_ID,
        ))
        .await
        .unwrap_err();
    assert_eq!(disagreeing.code(), Code::InvalidArgument);
    assert_eq!(reason(&disagreeing), "INVALID_ARGUMENT");

    let bad_field = app
        .keys
        .issue_key(issue_request("ci", "retry-1"))
        .await
        .unwrap_err();
    assert_eq!(bad_field.code(), Code::InvalidArgument);
    assert!(bad_field.message().contains("request_id"), "{bad_field:?}");
    let bad_header = app
        .keys
        .issue_key(with_header(issue_request("ci", ""), "retry-1"))
        .await
        .unwrap_err();
    assert_eq!(bad_header.code(), Code::InvalidArgument);
    assert!(
        bad_header.message().contains("idempotency-key"),
        "{bad_header:?}"
    );
    assert_eq!(key_count(&mut app.keys, "acme").await, 1);
    app.stop().await;
}

async fn another_caller_has_its_own_request_ids(db: TestDb) {
    let mut app = spawn(&db).await;
    let by_admin = app.issue_with(issue_request("ci", REQUEST_ID)).await;

    // A dashboard user sending the same id and parameters makes its own key, and its retry
    // gets that key back.
    let mut alice = keys_as(&app.channel, Some(&developer("alice")));
    let by_alice = alice
        .issue_key(issue_request("ci", REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(key_of(&by_alice).key_id, key_of(&by_admin).key_id);
    assert_ne!(by_alice.secret, by_admin.secret);
    let alice_retry = alice
        .issue_key(issue_request("ci", REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice_retry, by_alice);
    // So does another user of the same workspace.
    let mut bob = keys_as(&app.channel, Some(&developer("bob")));
    let by_bob = bob
        .issue_key(issue_request("ci", REQUEST_ID))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(key_of(&by_bob).key_id, key_of(&by_alice).key_id);
    assert_eq!(key_count(&mut app.keys, "acme").await, 3);

    // An API key revoking another key with the id the admin used for IssueKey: not a reuse of
    // the admin's id, but a request of its own, which runs.
    let caller = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "automation".into(),
            role: pb::Role::Developer as i32,
            ..Default::default()
        })
        .await;
    let mut automation = keys_as(&app.channel, Some(&caller.secret));
    let revoked = automation
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key_of(&by_bob).key_id.clone(),
            request_id: REQUEST_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.key.unwrap().revoke_time.is_some());
    app.stop().await;
}

/// 20 identical IssueKey calls at once (on PostgreSQL, split across two replicas of one
/// database): one key, one event, and every caller gets that key's secret.
async fn concurrent_duplicates_run_once(db: TestDb) {
    let a = spawn(&db).await;
    let b = match db.backend {
        Backend::Postgres => Some(spawn(&db).await),
        Backend::Sqlite => None,
    };
    let clients: Vec<KeysClient> = (0..20)
        .map(|index| match (&b, index % 2) {
            (Some(b), 1) => b.keys.clone(),
            _ => a.keys.clone(),
        })
        .collect();
    let calls = clients.into_iter().map(|mut client| {
        tokio::spawn(async move {
            client
                .issue_key(issue_request("once", REQUEST_ID))
                .await
                .map(tonic::Response::into_inner)
        })
    });
    let mut responses = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        responses.push(call.await.unwrap().expect("every duplicate succeeds"));
    }

    let first = &responses[0];
    for response in &responses {
        assert_eq!(response, first);
    }
    let mut a = a;
    assert_eq!(key_count(&mut a.keys, "acme").await, 1);
    assert_eq!(audit_events(&db).await.len(), 1);
    assert_eq!(
        code(&a.verify_key(&first.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    if let Some(b) = b {
        b.stop().await;
    }
    a.stop().await;
}

async fn a_retry_after_the_window_runs_again(db: TestDb) {
    let window = Duration::from_millis(300);
    let mut app = spawn_with_window(&db, window).await;
    let first = app.issue_with(issue_request("ci", REQUEST_ID)).await;
    // Waiting out the window is the point of this test: nothing else can be awaited.
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    let later = app.issue_with(issue_request("ci", REQUEST_ID)).await;

    assert_ne!(key_of(&later).key_id, key_of(&first).key_id);
    assert_ne!(later.secret, first.secret);
    assert_eq!(key_count(&mut app.keys, "acme").await, 2);
    assert_eq!(audit_events(&db).await.len(), 2);
    // The new claim took the old one's place.
    assert_eq!(claim_count(&db).await, 1);
    app.stop().await;
}

async fn claims_past_the_window_are_pruned(db: TestDb) {
    let mut config = test_config(&db);
    config.idempotency.window = Duration::from_millis(100);
    config.idempotency.prune_interval = Duration::from_millis(20);
    config.idempotency.prune_batch = 1;
    let mut app = TestApp::spawn_with(config).await;
    for request_id in [REQUEST_ID, OTHER_REQUEST_ID] {
        app.issue_with(issue_request(request_id, request_id)).await;
    }
    // The pruning runs in the background and tells nobody: watch the table empty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while claim_count(&db).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "claims were not pruned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(key_count(&mut app.keys, "acme").await, 2, "keys stay");
    app.stop().await;
}

async fn a_failed_request_fails_the_same_way_when_retried(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue("acme", "revoked").await;
    let key_id = key_of(&issued).key_id.clone();
    app.revoke("acme", &key_id).await.unwrap();
    let rotate = pb::RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id,
        request_id: REQUEST_ID.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let status = app.keys.rotate_key(rotate.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason(&status), "KEY_REVOKED");
    }
    assert_eq!(claim_count(&db).await, 0, "a failed request claims nothing");
    assert_eq!(key_count(&mut app.keys, "acme").await, 1);
    assert_eq!(audit_events(&db).await.len(), 2, "issue and revoke");

    // The id of a failed request was never spent: it is still free for a request of its own.
    let missing = pb::RevokeKeyRequest {
        workspace_id: "globex".into(),
        key_id: "AAAAAAAAAAAA".into(),
        request_id: OTHER_REQUEST_ID.into(),
        ..Default::default()
    };
    let status = app.keys.revoke_key(missing).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "globex".into(),
            name: "late".into(),
            ..Default::default()
        })
        .await;
    let revoked = app
        .keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "globex".into(),
            key_id: key_of(&issued).key_id.clone(),
            request_id: OTHER_REQUEST_ID.into(),
            ..Default::default()
        })
        .await
        .expect("another key: another request, which runs");
    assert!(revoked.into_inner().key.unwrap().revoke_time.is_some());
    app.stop().await;
}

on_both_databases!(
    issue_key_is_replayed,
    rotate_key_is_replayed,
    revoke_key_is_replayed,
    update_key_is_replayed,
    issue_trial_key_is_replayed,
    a_request_id_reused_for_another_request_is_refused,
    the_header_works_like_the_field,
    another_caller_has_its_own_request_ids,
    concurrent_duplicates_run_once,
    a_retry_after_the_window_runs_again,
    claims_past_the_window_are_pruned,
    a_failed_request_fails_the_same_way_when_retried,
);
