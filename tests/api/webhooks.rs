//! Webhooks, end to end: a real HTTP endpoint on 127.0.0.1 receives what the server sends.
//! Signatures verify (computed here independently); retries after 500s and after timeouts; order
//! per endpoint; giving up after the retry period and redelivering; targets that would reach the
//! server itself or the metadata service refused; roles and tenancy; two replicas deliver each
//! event once; a replica killed mid-delivery loses nothing. Nothing sleeps for a fixed time: each
//! test awaits the request itself, or a later one that can only come after it.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use key_authority::config::Config;
use key_authority::pb;
use tonic::Code;

use crate::binary::{BINARY, connect, free_port};
use crate::common::{
    Backend, KeysClient, TestApp, TestDb, jwt_user, key_of, keys_as, on_both_databases, reason,
    test_config, with_dashboard_jwts,
};
use crate::webhook_receiver::{Receiver, Reply};

on_both_databases!(
    a_webhook_gets_signed_events_of_the_types_it_wants,
    failed_attempts_are_retried_in_order_and_recorded,
    a_delivery_is_given_up_after_the_retry_period_and_can_be_redelivered,
    targets_that_reach_this_server_or_the_metadata_service_are_refused,
    webhooks_belong_to_their_workspace_and_need_a_developer,
    a_deleted_webhook_gets_nothing_more,
    replicas_deliver_each_event_once,
    a_replica_killed_mid_delivery_loses_nothing,
);

/// Webhooks to 127.0.0.1 allowed; short timeouts and backoff so that retries take milliseconds.
fn webhook_config(db: &TestDb) -> Config {
    let mut config = test_config(db);
    config.webhooks.allow_private_targets = true;
    config.webhooks.timeout = Duration::from_millis(500);
    config.webhooks.backoff_base = Duration::from_millis(50);
    config.webhooks.backoff_max = Duration::from_millis(200);
    config.webhooks.poll_interval = Duration::from_millis(100);
    config
}

fn create_request(workspace_id: &str, url: &str, types: &[&str]) -> pb::CreateWebhookRequest {
    pb::CreateWebhookRequest {
        workspace_id: workspace_id.into(),
        url: url.into(),
        event_types: types.iter().map(|kind| (*kind).to_owned()).collect(),
        description: "test endpoint".into(),
    }
}

/// Creates a webhook; returns it and its signing secret.
async fn create(
    keys: &mut KeysClient,
    workspace_id: &str,
    url: &str,
    types: &[&str],
) -> (pb::Webhook, String) {
    let created = keys
        .create_webhook(create_request(workspace_id, url, types))
        .await
        .expect("CreateWebhook")
        .into_inner();
    (created.webhook.unwrap(), created.signing_secret)
}

async fn deliveries(
    keys: &mut KeysClient,
    webhook: &pb::Webhook,
    state: pb::WebhookDeliveryState,
) -> Vec<pb::WebhookDelivery> {
    keys.list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
        workspace_id: webhook.workspace_id.clone(),
        webhook_id: webhook.webhook_id.clone(),
        state: state as i32,
        ..Default::default()
    })
    .await
    .expect("ListWebhookDeliveries")
    .into_inner()
    .deliveries
}

fn all_states() -> pb::WebhookDeliveryState {
    pb::WebhookDeliveryState::Unspecified
}

fn attempts(delivery: &pb::WebhookDelivery) -> Vec<(i32, i32, String)> {
    delivery
        .attempts
        .iter()
        .map(|attempt| (attempt.attempt, attempt.http_status, attempt.error.clone()))
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn a_webhook_gets_signed_events_of_the_types_it_wants(db: TestDb) {
    let mut app = TestApp::spawn_with(webhook_config(&db)).await;
    let mut receiver = Receiver::accepting().await;
    let (webhook, secret) = create(
        &mut app.keys,
        "acme",
        &receiver.url,
        &["key.issued", "key.rotated"],
    )
    .await;
    assert_eq!(webhook.event_types, ["key.issued", "key.rotated"]);
    assert_eq!(webhook.created_by, "admin");
    assert!(secret.starts_with("whsec_"));
    assert!(secret.starts_with(&webhook.secret_hint));
    assert_eq!(webhook.secret_hint.len(), 10);

    let first = key_of(&app.issue("acme", "first").await).key_id.clone();
    // Another workspace's events are not this webhook's.
    app.issue("globex", "elsewhere").await;
    let rotation = app
        .rotate(
            "acme",
            &first,
            Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        )
        .await
        .unwrap();
    let successor = rotation.key.unwrap().key_id;
    // Not a type it wants.
    app.revoke("acme", &successor).await.unwrap();
    let last = key_of(&app.issue("acme", "last").await).key_id.clone();

    let got = receiver.until("key.issued", &last).await;
    let seen: Vec<(String, String)> = got
        .iter()
        .map(|request| (request.event_type(), request.key_id()))
        .collect();
    assert_eq!(
        seen,
        [
            ("key.issued".to_owned(), first.clone()),
            ("key.rotated".to_owned(), first.clone()),
            ("key.issued".to_owned(), last.clone()),
        ]
    );
    let mut positions = Vec::new();
    for request in &got {
        assert!(request.signed_by(&secret), "the signature verifies");
        assert_eq!(request.header("content-type"), "application/json");
        let body = request.json();
        assert_eq!(request.event_id(), body["data"]["event_id"]);
        assert_eq!(body["data"]["type"], body["type"]);
        assert_eq!(body["data"]["workspace_id"], "acme");
        assert_eq!(body["data"]["actor"]["display"], "admin");
        let timestamp: i64 = request.header("webhook-timestamp").parse().unwrap();
        assert!((timestamp - unix_now()).abs() <= 60, "a current timestamp");
        positions.push(body["data"]["position"].as_i64().unwrap());
    }
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
    // key.rotated names both keys and when the old one stops working.
    let rotated = got[1].json();
    assert_eq!(rotated["data"]["key_id"], first.as_str());
    assert_eq!(rotated["data"]["new_key_id"], successor.as_str());
    let old_end = rotated["data"]["old_key_expire_time"].as_str().unwrap();
    let expected_end = rotation.previous_key.unwrap().expire_time.unwrap();
    assert_eq!(
        old_end,
        key_authority::timestamp::rfc3339(
            expected_end.seconds * 1_000_000 + i64::from(expected_end.nanos / 1000)
        )
    );

    // Another secret does not verify these requests.
    let (_, other_secret) = create(&mut app.keys, "acme", &receiver.url, &[]).await;
    assert_ne!(other_secret, secret);
    assert!(!got[0].signed_by(&other_secret));

    // Each delivery is recorded: newest first, one attempt each, answered 200.
    let recorded = deliveries(&mut app.keys, &webhook, all_states()).await;
    let recorded_ids: Vec<&str> = recorded.iter().map(|d| d.event_id.as_str()).collect();
    let sent_ids: Vec<String> = got.iter().rev().map(|request| request.event_id()).collect();
    assert_eq!(recorded_ids, sent_ids);
    for delivery in &recorded {
        assert_eq!(delivery.state, pb::WebhookDeliveryState::Succeeded as i32);
        assert_eq!(attempts(delivery), [(1, 200, String::new())]);
        assert!(!delivery.redelivery);
        assert_eq!(delivery.next_attempt_time, None);
    }
    app.stop().await;
}

async fn failed_attempts_are_retried_in_order_and_recorded(db: TestDb) {
    let mut config = webhook_config(&db);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut app = TestApp::spawn_with(config).await;
    // The first request fails with a 500, the second hangs past the timeout, then all succeed.
    let mut receiver = Receiver::scripted(|request| match request.index {
        0 => Reply::Status(500),
        1 => Reply::Hang,
        _ => Reply::Status(204),
    })
    .await;
    let (webhook, secret) = create(&mut app.keys, "acme", &receiver.url, &[]).await;
    let first = key_of(&app.issue("acme", "first").await).key_id.clone();
    let second = key_of(&app.issue("acme", "second").await).key_id.clone();

    let got = receiver.until("key.issued", &second).await;
    let keys: Vec<String> = got.iter().map(|request| request.key_id()).collect();
    // The second event waits until the first is delivered: one in flight, in order.
    assert_eq!(keys, [first.as_str(), &first, &first, &second]);
    // A third one arriving proves the second's attempt is recorded.
    let third = key_of(&app.issue("acme", "third").await).key_id.clone();
    assert_eq!(receiver.next().await.key_id(), third);
    assert!(got.iter().all(|request| request.signed_by(&secret)));
    let first_ids: HashSet<String> = got[..3].iter().map(|request| request.event_id()).collect();
    assert_eq!(first_ids.len(), 1, "a retry carries the same webhook-id");

    let mut recorded = deliveries(&mut app.keys, &webhook, all_states()).await;
    assert_eq!(recorded.len(), 3);
    // The third's own record may still be on its way.
    recorded.remove(0);
    assert_eq!(attempts(&recorded[0]), [(1, 204, String::new())]);
    assert_eq!(
        attempts(&recorded[1]),
        [
            (1, 500, "HTTP 500".to_owned()),
            (2, 0, "timed out after 500ms".to_owned()),
            (3, 204, String::new()),
        ]
    );
    assert_eq!(
        recorded[1].state,
        pb::WebhookDeliveryState::Succeeded as i32
    );
    let waited = recorded[1].attempts[1].duration.unwrap();
    assert!(
        waited.seconds * 1_000_000_000 + i64::from(waited.nanos) >= 500_000_000,
        "the timed-out attempt waited for the timeout"
    );

    // The listing filters by state and pages with tokens bound to the filter.
    assert!(
        deliveries(&mut app.keys, &webhook, pb::WebhookDeliveryState::Failed)
            .await
            .is_empty()
    );
    let page = app
        .keys
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: "acme".into(),
            webhook_id: webhook.webhook_id.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.deliveries.len(), 2);
    assert_eq!(page.deliveries[1].event_id, recorded[0].event_id);
    let rest = app
        .keys
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: "acme".into(),
            webhook_id: webhook.webhook_id.clone(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.deliveries[0].event_id, recorded[1].event_id);
    assert_eq!(rest.next_page_token, "");
    let foreign = app
        .keys
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: "acme".into(),
            webhook_id: webhook.webhook_id.clone(),
            page_token: page.next_page_token,
            state: pb::WebhookDeliveryState::Succeeded as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert_eq!(reason(&foreign), "INVALID_PAGE_TOKEN");

    // Metrics count the attempts, the failures (2) and the deliveries: the first three at least,
    // once the third's record is written (a fourth event arriving proves it); the fourth's own
    // may be counted or not yet.
    let fourth = key_of(&app.issue("acme", "fourth").await).key_id.clone();
    assert_eq!(receiver.next().await.key_id(), fourth);
    let text = crate::observability::scrape(app.server.metrics_addr.unwrap()).await;
    let samples = crate::observability::samples(&text);
    let sample = |name: &str| samples.get(name).copied().unwrap_or(-1.0);
    let delivered = sample("key_authority_webhook_deliveries_total");
    assert!(delivered == 3.0 || delivered == 4.0, "{delivered}");
    assert_eq!(sample("key_authority_webhook_attempt_failures_total"), 2.0);
    assert_eq!(
        sample("key_authority_webhook_attempts_total"),
        delivered + 2.0
    );
    assert_eq!(sample("key_authority_webhook_deliveries_failed_total"), 0.0);
    assert!(!text.contains(&secret[6..]), "no secret in the metrics");
    app.stop().await;
}

async fn a_delivery_is_given_up_after_the_retry_period_and_can_be_redelivered(db: TestDb) {
    let mut config = webhook_config(&db);
    config.webhooks.retry_period = Duration::from_millis(400);
    let mut app = TestApp::spawn_with(config).await;
    // key.issued fails while `failing` holds; every other type succeeds.
    let failing = Arc::new(AtomicBool::new(true));
    let fails = failing.clone();
    let mut receiver = Receiver::scripted(move |request| {
        if request.event_type() == "key.issued" && fails.load(Ordering::SeqCst) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let (webhook, secret) = create(&mut app.keys, "acme", &receiver.url, &[]).await;
    let doomed = key_of(&app.issue("acme", "doomed").await).key_id.clone();
    app.revoke("acme", &doomed).await.unwrap();

    // The revocation is sent only once the issue is given up.
    let got = receiver.until("key.revoked", &doomed).await;
    let (failed, revoked) = got.split_at(got.len() - 1);
    assert!(
        failed.len() >= 2,
        "retried before giving up: {}",
        failed.len()
    );
    assert!(
        failed
            .iter()
            .all(|request| request.event_type() == "key.issued")
    );
    let issued_event = failed[0].event_id();
    assert_eq!(revoked[0].event_type(), "key.revoked");

    let recorded = deliveries(&mut app.keys, &webhook, pb::WebhookDeliveryState::Failed).await;
    assert_eq!(recorded.len(), 1);
    let given_up = &recorded[0];
    assert_eq!(given_up.event_id, issued_event);
    assert_eq!(given_up.attempts.len(), failed.len());
    assert!(
        given_up
            .attempts
            .iter()
            .all(|attempt| attempt.http_status == 503 && attempt.error == "HTTP 503")
    );
    let micros = |at: &Option<prost_types::Timestamp>| {
        let at = at.unwrap();
        at.seconds * 1_000_000 + i64::from(at.nanos / 1000)
    };
    let first_try = micros(&given_up.attempts[0].attempt_time);
    let last_try = micros(&given_up.attempts.last().unwrap().attempt_time);
    assert!(
        last_try - first_try >= 400_000,
        "retried for the whole period"
    );
    assert_eq!(given_up.next_attempt_time, None);

    // Redelivered by hand, once the endpoint works again: the same event, the same webhook-id.
    failing.store(false, Ordering::SeqCst);
    let redelivery = app
        .keys
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            workspace_id: "acme".into(),
            webhook_id: webhook.webhook_id.clone(),
            event_id: issued_event.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .delivery
        .unwrap();
    assert_eq!(redelivery.event_id, issued_event);
    assert!(redelivery.redelivery);
    assert_eq!(redelivery.event_type, "key.issued");
    let again = receiver.next().await;
    assert_eq!(again.event_id(), issued_event);
    assert!(again.signed_by(&secret));
    assert_eq!(again.body, failed[0].body, "the same event, byte for byte");

    // A later event is sent after the redelivery is recorded (one in flight, in queue order).
    let later = key_of(&app.issue("acme", "later").await).key_id.clone();
    assert_eq!(receiver.next().await.key_id(), later);
    let recorded = deliveries(&mut app.keys, &webhook, all_states()).await;
    let summary: Vec<(String, i32, bool)> = recorded[1..]
        .iter()
        .map(|delivery| {
            (
                delivery.event_type.clone(),
                delivery.state,
                delivery.redelivery,
            )
        })
        .collect();
    let succeeded = pb::WebhookDeliveryState::Succeeded as i32;
    assert_eq!(
        summary,
        [
            ("key.issued".to_owned(), succeeded, true),
            ("key.revoked".to_owned(), succeeded, false),
            (
                "key.issued".to_owned(),
                pb::WebhookDeliveryState::Failed as i32,
                false
            ),
        ]
    );
    assert_eq!(recorded[0].event_type, "key.issued");
    assert_eq!(attempts(&recorded[1]), [(1, 200, String::new())]);

    // Unknown events, other workspaces' events and webhooks are not found.
    for (workspace_id, webhook_id, event_id, expected) in [
        (
            "acme",
            webhook.webhook_id.as_str(),
            "5e3b9d2c-6a1f-4c7e-8b0d-3a9f2e6c1b57",
            "EVENT_NOT_FOUND",
        ),
        (
            "acme",
            webhook.webhook_id.as_str(),
            "not-a-uuid",
            "EVENT_NOT_FOUND",
        ),
        (
            "globex",
            webhook.webhook_id.as_str(),
            issued_event.as_str(),
            "WEBHOOK_NOT_FOUND",
        ),
    ] {
        let status = app
            .keys
            .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
                workspace_id: workspace_id.into(),
                webhook_id: webhook_id.into(),
                event_id: event_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{event_id}");
        assert_eq!(reason(&status), expected, "{event_id}");
    }
    let globex_event = {
        let (globex_hook, _) = create(&mut app.keys, "globex", &receiver.url, &[]).await;
        app.issue("globex", "theirs").await;
        let theirs = receiver.next().await;
        assert!(theirs.json()["data"]["workspace_id"] == "globex");
        drop(globex_hook);
        theirs.event_id()
    };
    let status = app
        .keys
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            workspace_id: "acme".into(),
            webhook_id: webhook.webhook_id.clone(),
            event_id: globex_event,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "EVENT_NOT_FOUND");
    app.stop().await;
}

async fn targets_that_reach_this_server_or_the_metadata_service_are_refused(db: TestDb) {
    // By default: no loopback, no private network.
    let mut config = test_config(&db);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut strict = TestApp::spawn_with(config).await;
    let receiver = Receiver::accepting().await;
    for url in [
        receiver.url.as_str(),
        "http://localhost:8080/hook",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://192.168.1.20/hook",
        "http://0.0.0.0:8080/hook",
        "http://2130706433:8080/hook",
    ] {
        let status = strict
            .keys
            .create_webhook(create_request("acme", url, &[]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url}");
        assert_eq!(reason(&status), "WEBHOOK_TARGET_FORBIDDEN", "{url}");
    }
    for (url, types) in [
        ("", vec![]),
        ("ftp://example.com/hook", vec![]),
        ("https://user:password@example.com/hook", vec![]),
        ("https://example.com/hook#part", vec![]),
        ("https://example.com/hook", vec!["key.exploded"]),
        ("https://example.com/hook", vec!["key.issued", "key.issued"]),
    ] {
        let status = strict
            .keys
            .create_webhook(create_request("acme", url, &types))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{url} {types:?}");
        assert_eq!(reason(&status), "INVALID_ARGUMENT", "{url} {types:?}");
    }

    // With private targets allowed: a receiver on this host is fine; this server, its metrics
    // port and the metadata service are still refused.
    let mut config = webhook_config(&db);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut lenient = TestApp::spawn_with(config).await;
    let own = lenient.server.local_addr.port();
    let metrics = lenient.server.metrics_addr.unwrap().port();
    for url in [
        format!("http://127.0.0.1:{own}/"),
        format!("http://localhost:{own}/"),
        format!("http://[::1]:{own}/"),
        format!("http://127.0.0.1:{metrics}/metrics"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fe80::1]/".to_owned(),
    ] {
        let status = lenient
            .keys
            .create_webhook(create_request("acme", &url, &[]))
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "WEBHOOK_TARGET_FORBIDDEN", "{url}");
    }
    create(&mut lenient.keys, "acme", &receiver.url, &[]).await;
    let listed = lenient
        .keys
        .list_webhooks(pb::ListWebhooksRequest {
            workspace_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(listed.len(), 1, "nothing refused was stored");
    assert_eq!(listed[0].url, receiver.url);
    strict.stop().await;
    lenient.stop().await;
}

async fn webhooks_belong_to_their_workspace_and_need_a_developer(db: TestDb) {
    let mut config = with_dashboard_jwts(webhook_config(&db));
    config.webhooks.max_per_workspace = 2;
    let mut app = TestApp::spawn_with(config).await;
    let receiver = Receiver::accepting().await;
    let viewer = jwt_user("acme", "viewer");
    let developer = jwt_user("acme", "developer");
    let outsider = jwt_user("globex", "account_admin");

    let mut as_viewer = keys_as(&app.channel, Some(&viewer));
    let status = as_viewer
        .create_webhook(create_request("", &receiver.url, &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = as_viewer
        .list_webhooks(pb::ListWebhooksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut as_developer = keys_as(&app.channel, Some(&developer));
    let (webhook, secret) = create(&mut as_developer, "", &receiver.url, &["key.revoked"]).await;
    assert_eq!(webhook.workspace_id, "acme");
    assert_eq!(webhook.created_by, "user:user-1");

    // API keys of the workspace: developers manage webhooks, viewers do not.
    for (role, allowed) in [(pb::Role::Developer, true), (pb::Role::Viewer, false)] {
        let key = app
            .issue_with(pb::IssueKeyRequest {
                workspace_id: "acme".into(),
                name: format!("{role:?}"),
                role: role as i32,
                ..Default::default()
            })
            .await;
        let mut as_key = keys_as(&app.channel, Some(&key.secret));
        let listed = as_key
            .list_webhooks(pb::ListWebhooksRequest::default())
            .await;
        assert_eq!(listed.is_ok(), allowed, "{role:?}");
    }

    let listed = as_developer
        .list_webhooks(pb::ListWebhooksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert_eq!(listed, std::slice::from_ref(&webhook));

    // Another workspace sees nothing of it.
    let mut as_outsider = keys_as(&app.channel, Some(&outsider));
    let theirs = as_outsider
        .list_webhooks(pb::ListWebhooksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .webhooks;
    assert!(theirs.is_empty());
    let status = as_outsider
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: String::new(),
            webhook_id: webhook.webhook_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "WEBHOOK_NOT_FOUND");
    let status = as_outsider
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            webhook_id: webhook.webhook_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "WEBHOOK_NOT_FOUND");
    let status = as_outsider
        .list_webhooks(pb::ListWebhooksRequest {
            workspace_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // A workspace has at most its limit.
    create(&mut as_developer, "", &receiver.url, &[]).await;
    let status = as_developer
        .create_webhook(create_request("", &receiver.url, &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "TOO_MANY_WEBHOOKS");

    // Deleting returns it; a second delete finds nothing.
    let deleted = as_developer
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: String::new(),
            webhook_id: webhook.webhook_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    assert_eq!(deleted, webhook);
    let status = as_developer
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: String::new(),
            webhook_id: webhook.webhook_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "WEBHOOK_NOT_FOUND");
    app.stop().await;

    // The signing secret is nowhere in the database.
    let secret_bytes = &secret.as_bytes()["whsec_".len()..];
    for file in db.data_files().await {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        assert!(
            memchr::memmem::find(&bytes, secret_bytes).is_none(),
            "the webhook secret was found in {file:?}"
        );
    }
}

async fn a_deleted_webhook_gets_nothing_more(db: TestDb) {
    let mut app = TestApp::spawn_with(webhook_config(&db)).await;
    let mut deleted_endpoint = Receiver::accepting().await;
    let mut kept_endpoint = Receiver::accepting().await;
    let (doomed, _) = create(&mut app.keys, "acme", &deleted_endpoint.url, &[]).await;
    create(&mut app.keys, "acme", &kept_endpoint.url, &[]).await;
    let before = key_of(&app.issue("acme", "before").await).key_id.clone();
    assert_eq!(deleted_endpoint.next().await.key_id(), before);
    assert_eq!(kept_endpoint.next().await.key_id(), before);

    app.keys
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: "acme".into(),
            webhook_id: doomed.webhook_id.clone(),
        })
        .await
        .unwrap();
    for name in ["after", "later"] {
        let key_id = key_of(&app.issue("acme", name).await).key_id.clone();
        assert_eq!(kept_endpoint.next().await.key_id(), key_id);
    }
    assert!(
        deleted_endpoint.drain().is_empty(),
        "nothing after the delete"
    );
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
        apps.push(TestApp::spawn_with(webhook_config(db)).await);
    }
    apps
}

async fn replicas_deliver_each_event_once(db: TestDb) {
    let mut apps = replicas(&db).await;
    let mut endpoints = [Receiver::accepting().await, Receiver::accepting().await];
    for endpoint in &endpoints {
        create(&mut apps[0].keys, "acme", &endpoint.url, &["key.issued"]).await;
    }
    let mut issued = Vec::new();
    for index in 0..24 {
        let replica = index % apps.len();
        let key = apps[replica].issue("acme", &format!("key {index}")).await;
        issued.push(key_of(&key).key_id.clone());
    }
    for endpoint in &mut endpoints {
        let got = endpoint.until("key.issued", issued.last().unwrap()).await;
        let keys: Vec<String> = got.iter().map(|request| request.key_id()).collect();
        assert_eq!(keys, issued, "each event once, in order");
    }
    for app in apps {
        app.stop().await;
    }
    for endpoint in &mut endpoints {
        assert!(endpoint.drain().is_empty(), "no event sent twice");
    }
}

/// A replica (the real binary) is killed with SIGKILL while its endpoint holds the request open;
/// a replica started afterwards sends that delivery once the dead one's lease runs out.
async fn a_replica_killed_mid_delivery_loses_nothing(db: TestDb) {
    let port = free_port();
    let mut receiver = Receiver::scripted(|request| match request.index {
        0 => Reply::Hang,
        _ => Reply::Status(200),
    })
    .await;
    let mut doomed = Command::new(BINARY)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--webhook-allow-private-targets",
            "--webhook-timeout",
            "1s",
        ])
        .env("DATABASE_URL", &db.url)
        .env("KEY_AUTHORITY_ADMIN_TOKEN", "kill-test-admin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let channel = connect(port).await;
    let mut keys = keys_as(&channel, Some("kill-test-admin"));
    let (webhook, secret) = create(&mut keys, "acme", &receiver.url, &[]).await;
    let issued = keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "in flight".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key_id = issued.key.unwrap().key_id;
    let in_flight = receiver.next().await;
    assert_eq!(in_flight.key_id(), key_id);
    doomed.kill().unwrap();
    tokio::task::spawn_blocking(move || doomed.wait())
        .await
        .unwrap()
        .unwrap();
    drop((keys, channel));

    let mut survivor = TestApp::spawn_with(webhook_config(&db)).await;
    let resent = receiver.next().await;
    assert_eq!(resent.event_id(), in_flight.event_id());
    assert_eq!(resent.body, in_flight.body);
    assert!(resent.signed_by(&secret));
    // Once the survivor has recorded its attempt, the delivery is done, with that one attempt
    // (the dead replica recorded none). A later event arriving proves the record is written.
    let later = key_of(&survivor.issue("acme", "later").await)
        .key_id
        .clone();
    assert_eq!(receiver.next().await.key_id(), later);
    let recorded = deliveries(&mut survivor.keys, &webhook, all_states()).await;
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1].event_id, in_flight.event_id());
    assert_eq!(
        recorded[1].state,
        pb::WebhookDeliveryState::Succeeded as i32
    );
    assert_eq!(attempts(&recorded[1]), [(1, 200, String::new())]);
    survivor.stop().await;
}
