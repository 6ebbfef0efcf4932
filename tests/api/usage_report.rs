//! ReportUsage: a caller-side verifier's counts reach the keys' counters once per batch, only for
//! keys of the reporter's workspace without a usage limit, and only from a developer or above.

use key_authority::pb;
use tonic::Code;

use crate::common::{
    KeysClient, TestApp, TestDb, jwt_user, key_of, keys_as, on_both_databases, reason, test_config,
    with_dashboard_jwts,
};

const BATCH: &str = "0b6f3c1e-6a52-4a55-9d7e-2f9f0d6e1a01";
const OTHER_BATCH: &str = "0b6f3c1e-6a52-4a55-9d7e-2f9f0d6e1a02";

fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn usage(key_id: &str, requests: i64, seconds: i64) -> pb::KeyUsage {
    pb::KeyUsage {
        key_id: key_id.to_owned(),
        requests,
        last_used_time: at(seconds),
    }
}

fn batch(workspace_id: &str, request_id: &str, usage: Vec<pb::KeyUsage>) -> pb::ReportUsageRequest {
    pb::ReportUsageRequest {
        workspace_id: workspace_id.to_owned(),
        request_id: request_id.to_owned(),
        usage,
    }
}

async fn report(
    client: &mut KeysClient,
    request: pb::ReportUsageRequest,
) -> Result<pb::ReportUsageResponse, tonic::Status> {
    client
        .report_usage(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Seconds since the epoch a minute ago: a last use the server accepts.
fn a_minute_ago() -> i64 {
    i64::try_from(crate::common::now()).unwrap() - 60
}

async fn a_batch_counts_once(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let key_id = key_of(&app.issue("acme", "reported").await).key_id.clone();
    let used = a_minute_ago();
    let first = batch("acme", BATCH, vec![usage(&key_id, 5, used)]);

    let answer = report(&mut app.keys, first.clone()).await.unwrap();
    assert_eq!(
        answer,
        pb::ReportUsageResponse {
            replayed: false,
            counted_keys: 1,
            skipped_key_ids: vec![],
        }
    );
    let key = app.get("acme", &key_id).await.unwrap();
    assert_eq!(key.total_requests, 5);
    assert_eq!(key.last_used_time, at(used));

    // The retry of a batch that committed counts nothing, and says so.
    let retry = report(&mut app.keys, first).await.unwrap();
    assert_eq!(
        retry,
        pb::ReportUsageResponse {
            replayed: true,
            counted_keys: 0,
            skipped_key_ids: vec![],
        }
    );
    assert_eq!(app.get("acme", &key_id).await.unwrap().total_requests, 5);

    // The same batch id with other counts is not a retry.
    let reused = report(
        &mut app.keys,
        batch("acme", BATCH, vec![usage(&key_id, 6, used)]),
    )
    .await
    .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&reused), "IDEMPOTENCY_KEY_REUSED");

    // Another batch adds up; an older last use leaves last_used_time as it is.
    let older = batch("acme", OTHER_BATCH, vec![usage(&key_id, 3, used - 600)]);
    assert_eq!(report(&mut app.keys, older).await.unwrap().counted_keys, 1);
    let key = app.get("acme", &key_id).await.unwrap();
    assert_eq!(key.total_requests, 8);
    assert_eq!(key.last_used_time, at(used));
    app.stop().await;
}

async fn only_the_reporters_unlimited_keys_count(db: TestDb) {
    let mut app = TestApp::spawn_with(with_dashboard_jwts(test_config(&db))).await;
    let ours = key_of(&app.issue("alpha", "ours").await).key_id.clone();
    let theirs = key_of(&app.issue("beta", "theirs").await).key_id.clone();
    let limited = key_of(
        &app.issue_with(pb::IssueKeyRequest {
            workspace_id: "alpha".into(),
            name: "limited".into(),
            usage_limit: 10,
            ..Default::default()
        })
        .await,
    )
    .key_id
    .clone();
    let developer = jwt_user("alpha", "developer");
    let mut client = keys_as(&app.channel, Some(&developer));
    let used = a_minute_ago();
    let entries = vec![
        usage(&theirs, 7, used),
        usage(&limited, 7, used),
        usage(&ours, 7, used),
        usage("AAAAAAAAAAAA", 7, used),
    ];

    let answer = report(&mut client, batch("", BATCH, entries))
        .await
        .unwrap();
    let mut skipped = vec![theirs.clone(), limited.clone(), "AAAAAAAAAAAA".to_owned()];
    skipped.sort();
    assert_eq!(
        answer,
        pb::ReportUsageResponse {
            replayed: false,
            counted_keys: 1,
            skipped_key_ids: skipped,
        }
    );
    assert_eq!(app.get("alpha", &ours).await.unwrap().total_requests, 7);
    let theirs_now = app.get("beta", &theirs).await.unwrap();
    assert_eq!(
        (theirs_now.total_requests, theirs_now.last_used_time),
        (0, None)
    );
    assert_eq!(app.get("alpha", &limited).await.unwrap().total_requests, 0);

    // Naming the other workspace is refused outright.
    let status = report(
        &mut client,
        batch("beta", OTHER_BATCH, vec![usage(&theirs, 1, used)]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "WORKSPACE_MISMATCH");
    app.stop().await;
}

async fn who_may_report_and_what(db: TestDb) {
    let mut app = TestApp::spawn_with(with_dashboard_jwts(test_config(&db))).await;
    let key_id = key_of(&app.issue("acme", "reported").await).key_id.clone();
    let used = a_minute_ago();
    let one = |request_id: &str| batch("acme", request_id, vec![usage(&key_id, 1, used)]);

    let viewer = jwt_user("acme", "viewer");
    let status = report(&mut keys_as(&app.channel, Some(&viewer)), one(BATCH))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = report(&mut keys_as(&app.channel, None), one(BATCH))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let invalid: Vec<(pb::ReportUsageRequest, &str)> = vec![
        (one(""), "request_id"),
        (one("not-a-uuid"), "request_id"),
        (batch("acme", BATCH, vec![]), "usage"),
        (
            batch(
                "acme",
                BATCH,
                vec![usage(&key_id, 1, used), usage(&key_id, 1, used)],
            ),
            "usage",
        ),
        (
            batch("acme", BATCH, vec![usage(&key_id, 0, used)]),
            "usage.requests",
        ),
        (
            batch("acme", BATCH, vec![usage(&key_id, 1_000_000_001, used)]),
            "usage.requests",
        ),
        (
            batch(
                "acme",
                BATCH,
                vec![pb::KeyUsage {
                    key_id: key_id.clone(),
                    requests: 1,
                    last_used_time: None,
                }],
            ),
            "usage.last_used_time",
        ),
        (
            batch("acme", BATCH, vec![usage("short", 1, used)]),
            "usage.key_id",
        ),
        (
            batch(
                "acme",
                BATCH,
                (0..1001).map(|_| usage(&key_id, 1, used)).collect(),
            ),
            "usage",
        ),
    ];
    for (request, field) in invalid {
        let status = report(&mut app.keys, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    assert_eq!(app.get("acme", &key_id).await.unwrap().total_requests, 0);

    // The idempotency-key header is the batch id as well.
    let developer = jwt_user("acme", "developer");
    let mut client = keys_as(&app.channel, Some(&developer));
    let mut request = tonic::Request::new(one(""));
    request
        .metadata_mut()
        .insert("idempotency-key", BATCH.parse().unwrap());
    let answer = client.report_usage(request).await.unwrap().into_inner();
    assert_eq!(answer.counted_keys, 1);
    assert!(report(&mut client, one(BATCH)).await.unwrap().replayed);
    assert_eq!(app.get("acme", &key_id).await.unwrap().total_requests, 1);

    // A reporter whose clock runs an hour ahead: counted, and dated no later than now.
    let ahead = used + 3660;
    let answer = report(
        &mut app.keys,
        batch("acme", OTHER_BATCH, vec![usage(&key_id, 2, ahead)]),
    )
    .await
    .unwrap();
    assert_eq!(answer.counted_keys, 1);
    let key = app.get("acme", &key_id).await.unwrap();
    assert_eq!(key.total_requests, 3);
    let dated = key.last_used_time.unwrap().seconds;
    let now = i64::try_from(crate::common::now()).unwrap();
    assert!(
        (used..=now).contains(&dated),
        "{dated} within [{used}, {now}]"
    );
    app.stop().await;
}

on_both_databases!(
    a_batch_counts_once,
    only_the_reporters_unlimited_keys_count,
    who_may_report_and_what,
);
