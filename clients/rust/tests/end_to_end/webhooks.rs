//! Webhooks: CreateWebhook to a receiver on 127.0.0.1 (the server allows private targets), the
//! signed POST of a key event checked with WebhookVerifier, ListWebhooks, ListWebhookDeliveries,
//! RedeliverWebhookEvent, DeleteWebhook, and the refusals.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use key_authority_client::{Error, KeyAuthorityClient, WebhookVerifier, pb, verify_webhook};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::Code;

use crate::harness::KeyAuthority;

const WORKSPACE: &str = "acme";
/// Longer than any delivery takes; only stops a broken test from hanging.
const WAIT: Duration = Duration::from_secs(15);

/// One POST the receiver got.
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP server on 127.0.0.1 that answers every POST with 200 and queues what it got.
struct Receiver {
    url: String,
    requests: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    async fn start() -> Self {
        let (sender, requests) = mpsc::unbounded_channel();
        let router = Router::new()
            .route("/{*path}", post(receive))
            .with_state(sender);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("an address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            url: format!("http://{address}/hooks/key-authority"),
            requests,
        }
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .unwrap_or_else(|_| panic!("no webhook request within {WAIT:?}"))
            .expect("the receiver runs")
    }
}

async fn receive(
    State(sender): State<mpsc::UnboundedSender<Received>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let _ = sender.send(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    StatusCode::OK
}

async fn start() -> (KeyAuthority, KeyAuthorityClient) {
    let authority =
        KeyAuthority::start_with(|config| config.webhooks.allow_private_targets = true).await;
    let admin = authority.admin().await;
    (authority, admin)
}

/// Reads until `done` holds (the server records a delivery's outcome just after the receiver
/// answered), panicking after WAIT.
async fn wait_until<T, F>(mut read: impl FnMut() -> F, done: impl Fn(&T) -> bool) -> T
where
    F: Future<Output = T>,
    T: std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached within {WAIT:?}; last read: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deliveries(admin: &KeyAuthorityClient, webhook_id: &str) -> Vec<pb::WebhookDelivery> {
    admin
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: webhook_id.into(),
            ..Default::default()
        })
        .await
        .expect("ListWebhookDeliveries")
        .deliveries
}

async fn list(admin: &KeyAuthorityClient) -> Vec<pb::Webhook> {
    admin
        .list_webhooks(pb::ListWebhooksRequest {
            workspace_id: WORKSPACE.into(),
        })
        .await
        .expect("ListWebhooks")
        .webhooks
}

fn create(url: &str, event_types: &[&str]) -> pb::CreateWebhookRequest {
    pb::CreateWebhookRequest {
        workspace_id: WORKSPACE.into(),
        url: url.into(),
        event_types: event_types.iter().map(|name| name.to_string()).collect(),
        ..Default::default()
    }
}

fn field(error: &Error) -> Option<&str> {
    error
        .error_info()
        .and_then(|info| info.metadata.get("field"))
        .map(String::as_str)
}

fn succeeded(found: &[pb::WebhookDelivery], count: usize) -> bool {
    found.len() == count
        && found
            .iter()
            .all(|each| each.state() == pb::WebhookDeliveryState::Succeeded)
}

#[tokio::test]
async fn a_key_event_is_posted_signed_listed_redelivered_and_the_webhook_deleted() {
    let (_authority, admin) = start().await;
    let mut receiver = Receiver::start().await;

    // Arrange: a webhook for key.issued only.
    let created = admin
        .create_webhook(pb::CreateWebhookRequest {
            description: "billing sync".into(),
            ..create(&receiver.url, &["key.issued"])
        })
        .await
        .expect("CreateWebhook");
    let secret = created.signing_secret;
    let webhook = created.webhook.expect("a webhook");
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(secret.len(), "whsec_".len() + 44);
    assert_eq!(webhook.webhook_id.len(), 36);
    assert_eq!(webhook.workspace_id, WORKSPACE);
    assert_eq!(webhook.url, receiver.url);
    assert_eq!(webhook.event_types, ["key.issued"]);
    assert_eq!(webhook.description, "billing sync");
    assert_eq!(webhook.created_by, "admin");
    assert!(webhook.create_time.is_some());
    // The hint: whsec_ and the first 4 characters of the base64.
    assert_eq!(webhook.secret_hint, secret[..10]);
    let verifier = WebhookVerifier::new(&secret).expect("a whsec_ secret");

    // Act: an event it wants.
    let (key_id, _) = crate::harness::issue(&admin, WORKSPACE, &[], 0).await;

    // Assert: one signed POST of it.
    let first = receiver.next().await;
    assert_eq!(first.path, "/hooks/key-authority");
    assert_eq!(first.headers["content-type"], "application/json");
    let payload = verifier
        .verify(&first.headers, &first.body)
        .expect("a valid signature");
    let event_id = first.headers["webhook-id"].to_str().unwrap().to_owned();
    assert_eq!(payload.event_type, "key.issued");
    assert!(payload.timestamp.ends_with('Z'), "{}", payload.timestamp);
    assert_eq!(payload.data.event_type, "key.issued");
    assert_eq!(payload.data.event_id, event_id);
    assert_eq!(payload.data.key_id, key_id);
    assert_eq!(payload.data.workspace_id, WORKSPACE);
    assert_eq!(payload.data.actor.kind, "admin");
    assert_eq!(payload.data.actor.display, "admin");
    assert!(payload.data.position > 0);
    assert_eq!(payload.data.new_key_id, None);
    // The one-call helper agrees.
    assert_eq!(
        verify_webhook(&secret, &first.headers, &first.body).unwrap(),
        payload
    );

    // ListWebhooks shows it, without its secret.
    assert_eq!(list(&admin).await, std::slice::from_ref(&webhook));

    // One delivery, SUCCEEDED after one attempt answered 200.
    let found = wait_until(
        || deliveries(&admin, &webhook.webhook_id),
        |found| succeeded(found, 1),
    )
    .await;
    let delivery = &found[0];
    assert_eq!(delivery.webhook_id, webhook.webhook_id);
    assert_eq!(delivery.event_id, event_id);
    assert_eq!(delivery.event_type, "key.issued");
    assert_eq!(delivery.position, payload.data.position);
    assert!(!delivery.redelivery);
    assert_eq!(delivery.next_attempt_time, None);
    assert_eq!(delivery.attempts.len(), 1);
    let attempt = &delivery.attempts[0];
    assert_eq!((attempt.attempt, attempt.http_status), (1, 200));
    assert_eq!(attempt.error, "");
    assert!(attempt.attempt_time.is_some() && attempt.duration.is_some());

    // Redelivery: a new pending delivery, then a second POST with the same webhook-id.
    let again = admin
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: webhook.webhook_id.clone(),
            event_id: event_id.clone(),
        })
        .await
        .expect("RedeliverWebhookEvent")
        .delivery
        .expect("a delivery");
    assert_eq!(again.event_id, event_id);
    assert_eq!(again.webhook_id, webhook.webhook_id);
    assert!(again.redelivery);
    assert_ne!(again.delivery_id, delivery.delivery_id);
    let second = receiver.next().await;
    assert_eq!(second.headers["webhook-id"], event_id.as_str());
    let redelivered = verifier.verify(&second.headers, &second.body).unwrap();
    assert_eq!(redelivered.data, payload.data);
    let both = wait_until(
        || deliveries(&admin, &webhook.webhook_id),
        |found| succeeded(found, 2),
    )
    .await;
    let summary: Vec<(&str, bool, i32)> = both
        .iter()
        .map(|each| {
            (
                each.delivery_id.as_str(),
                each.redelivery,
                each.attempts[0].http_status,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (again.delivery_id.as_str(), true, 200),
            (delivery.delivery_id.as_str(), false, 200)
        ]
    );

    // An event of a type it does not want is not sent: the next POST is the next key.issued
    // (deliveries go out in event order, so a key.revoked would have come first).
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .expect("RevokeKey");
    let (later_key_id, _) = crate::harness::issue(&admin, WORKSPACE, &[], 0).await;
    let third = receiver.next().await;
    let third = verifier.verify(&third.headers, &third.body).unwrap();
    assert_eq!(third.data.key_id, later_key_id);

    // Delete: the webhook as it was, then nothing listed, and it is gone for every call.
    let deleted = admin
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: webhook.webhook_id.clone(),
        })
        .await
        .expect("DeleteWebhook")
        .webhook;
    assert_eq!(deleted, Some(webhook.clone()));
    assert_eq!(list(&admin).await, []);
    let gone = admin
        .delete_webhook(pb::DeleteWebhookRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: webhook.webhook_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (gone.code(), gone.reason()),
        (Code::NotFound, Some("WEBHOOK_NOT_FOUND"))
    );
    let gone = admin
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: webhook.webhook_id.clone(),
            event_id,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (gone.code(), gone.reason()),
        (Code::NotFound, Some("WEBHOOK_NOT_FOUND"))
    );
}

#[tokio::test]
async fn a_rotation_payload_names_the_successor_and_the_old_keys_end() {
    let (_authority, admin) = start().await;
    let mut receiver = Receiver::start().await;
    let created = admin
        .create_webhook(create(&receiver.url, &["key.rotated"]))
        .await
        .expect("CreateWebhook");
    let (key_id, _) = crate::harness::issue(&admin, WORKSPACE, &[], 0).await;
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("RotateKey");
    let successor = rotated.key.expect("a successor").key_id;

    let request = receiver.next().await;
    let payload = verify_webhook(&created.signing_secret, &request.headers, &request.body)
        .expect("a valid signature");
    assert_eq!(payload.event_type, "key.rotated");
    assert_eq!(payload.data.key_id, key_id);
    assert_eq!(payload.data.new_key_id.as_deref(), Some(successor.as_str()));
    let old_key_end = payload.data.old_key_expire_time.expect("the old key's end");
    assert!(old_key_end.ends_with('Z'), "{old_key_end}");
}

#[tokio::test]
async fn metadata_addresses_and_the_server_itself_are_refused() {
    let (authority, admin) = start().await;
    let own = format!("http://{}/", authority.server.local_addr);
    for url in [
        "http://169.254.169.254/",
        "http://169.254.169.254/latest/meta-data/",
        own.as_str(),
    ] {
        let refused = admin
            .create_webhook(create(url, &["key.issued"]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}");
        assert_eq!(refused.reason(), Some("WEBHOOK_TARGET_FORBIDDEN"), "{url}");
        assert_eq!(field(&refused), Some("url"));
    }
    assert_eq!(list(&admin).await, []);
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let (_authority, admin) = start().await;
    for url in [
        "",
        "ftp://example.com/",
        "not a url",
        "http://user:pw@127.0.0.1/",
    ] {
        let refused = admin.create_webhook(create(url, &[])).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{url}");
        assert_eq!(refused.reason(), Some("INVALID_ARGUMENT"));
        assert_eq!(field(&refused), Some("url"));
    }
    for event_types in [&["key.unknown"][..], &["key.issued", "key.issued"]] {
        let refused = admin
            .create_webhook(create("http://127.0.0.1:9/", event_types))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(field(&refused), Some("event_types"));
    }
    let refused = admin
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f".into(),
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), field(&refused)),
        (Code::InvalidArgument, Some("page_size"))
    );
    let refused = admin
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            workspace_id: WORKSPACE.into(),
            webhook_id: "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.reason()),
        (Code::NotFound, Some("WEBHOOK_NOT_FOUND"))
    );
    assert_eq!(list(&admin).await, []);
}
