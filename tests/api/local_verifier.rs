//! The caller-side verifier (`key_authority_client::LocalVerifier`) against real servers: warm
//! keys answered in the caller, a revocation on another replica refused there as soon as its
//! event arrives, narrowed scopes and rotations taking effect locally, a cut stream dropping the
//! local state (and an unreachable authority meaning UNAVAILABLE, never "invalid"), and usage
//! exact after a graceful shutdown. Every wait is for an event the verifier reports.

use std::time::Duration;

use key_authority::pb;
use key_authority_client::pb as client_pb;
use key_authority_client::pb::VerifyCode;
use key_authority_client::{KeyAuthorityClient, LocalVerifier, Verification};
use prost_types::FieldMask;
use tonic::Code;

use crate::common::{ADMIN_TOKEN, TestApp, TestDb, key_of, on_both_databases};
use crate::replicas::replica;

/// How long an awaited event may take: far more than it ever should.
const PATIENCE: Duration = Duration::from_secs(20);

async fn admin_client(app: &TestApp) -> KeyAuthorityClient {
    KeyAuthorityClient::connect(format!("http://{}", app.server.local_addr))
        .await
        .expect("connects")
        .with_bearer_token(ADMIN_TOKEN)
        .expect("an ASCII token")
}

/// A verifier of acme's keys through `app`, ready to answer locally. `settle` zero: these tests
/// await each event, so no replica lag needs waiting out (the fill rule has unit tests).
async fn local_verifier(app: &TestApp, expiry_margin: Duration) -> LocalVerifier {
    let verifier = LocalVerifier::builder(admin_client(app).await)
        .workspaces(["acme"])
        .settle(Duration::ZERO)
        .expiry_margin(expiry_margin)
        .usage_interval(Duration::from_secs(3600))
        .start()
        .expect("starts");
    tokio::time::timeout(PATIENCE, verifier.wait_ready())
        .await
        .expect("the event stream connects");
    verifier
}

async fn verify(verifier: &LocalVerifier, key: &str, scopes: &[&str]) -> Verification {
    let scopes: Vec<String> = scopes.iter().map(|scope| scope.to_string()).collect();
    verifier
        .verify(key, &scopes, None)
        .await
        .expect("an answer")
}

/// Runs `change`, then waits until the verifier has applied one more event.
async fn after_event<F: std::future::Future>(verifier: &LocalVerifier, change: F) -> F::Output {
    let mut status = verifier.status();
    let before = status.borrow_and_update().events_applied;
    let output = change.await;
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|status| status.events_applied > before),
    )
    .await
    .expect("the event arrives in time")
    .expect("the stream goes on");
    output
}

/// The first verify asks the authority; the second is answered here.
async fn warm(verifier: &LocalVerifier, key: &str, scopes: &[&str]) -> Verification {
    let first = verify(verifier, key, scopes).await;
    assert_eq!((first.code, first.local), (VerifyCode::Valid, false));
    let second = verify(verifier, key, scopes).await;
    assert_eq!((second.code, second.local), (VerifyCode::Valid, true));
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_another_replica_is_refused_locally_once_its_event_arrives() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let b = replica(&db).await;
    let verifier = local_verifier(&b, Duration::from_secs(1)).await;

    let issued = a.issue("acme", "revoked elsewhere").await;
    let key_id = key_of(&issued).key_id.clone();
    let warm_answer = warm(&verifier, &issued.secret, &[]).await;
    assert_eq!(warm_answer.key.as_ref().unwrap().key_id, key_id);

    after_event(&verifier, a.revoke("acme", &key_id))
        .await
        .unwrap();
    let answer = verify(&verifier, &issued.secret, &[]).await;
    assert_eq!((answer.code, answer.local), (VerifyCode::Revoked, true));
    assert_eq!(
        answer.key.unwrap().state,
        client_pb::KeyState::Revoked as i32
    );

    // Disabling travels the same way; enabling lets the key verify again (asked remotely).
    let issued = a.issue("acme", "disabled elsewhere").await;
    let key_id = key_of(&issued).key_id.clone();
    warm(&verifier, &issued.secret, &[]).await;
    let set_enabled = |enabled: bool| pb::UpdateKeyRequest {
        key: Some(pb::Key {
            workspace_id: "acme".into(),
            key_id: key_id.clone(),
            enabled,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["enabled".into()],
        }),
        ..Default::default()
    };
    after_event(&verifier, a.keys.update_key(set_enabled(false)))
        .await
        .unwrap();
    let answer = verify(&verifier, &issued.secret, &[]).await;
    assert_eq!((answer.code, answer.local), (VerifyCode::Disabled, true));
    after_event(&verifier, a.keys.update_key(set_enabled(true)))
        .await
        .unwrap();
    warm(&verifier, &issued.secret, &[]).await;

    // A rotation on the other replica: the old key works through its grace period, and a key
    // that close to its end is not answered locally.
    let issued = a.issue("acme", "rotated elsewhere").await;
    let key_id = key_of(&issued).key_id.clone();
    warm(&verifier, &issued.secret, &[]).await;
    let grace = prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    };
    let rotated = after_event(&verifier, a.rotate("acme", &key_id, Some(grace)))
        .await
        .unwrap();
    let answer = verify(&verifier, &issued.secret, &[]).await;
    assert_eq!((answer.code, answer.local), (VerifyCode::Valid, false));
    let old_key_end = rotated.previous_key.as_ref().unwrap().expire_time;
    assert!(old_key_end.is_some());
    assert_eq!(
        answer
            .key
            .as_ref()
            .unwrap()
            .expire_time
            .map(|at| at.seconds),
        old_key_end.map(|at| at.seconds),
        "the grace period's end"
    );
    let answer = verify(&verifier, &issued.secret, &[]).await;
    assert_eq!(
        (answer.code, answer.local),
        (VerifyCode::Valid, true),
        "an hour left is far from the 1 s margin"
    );
    verifier.shutdown().await.unwrap();
}

async fn narrowed_scopes_take_effect_locally(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let verifier = local_verifier(&app, Duration::from_secs(1)).await;
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "scoped".into(),
            scopes: vec!["orders:read".into(), "orders:write".into()],
            ..Default::default()
        })
        .await;
    let key_id = key_of(&issued).key_id.clone();
    warm(&verifier, &issued.secret, &["orders:write"]).await;
    // A scope the state does not plainly grant is the authority's to refuse.
    let answer = verify(&verifier, &issued.secret, &["billing:read"]).await;
    assert_eq!(
        (answer.code, answer.local),
        (VerifyCode::InsufficientScope, false)
    );

    let narrow = pb::UpdateKeyRequest {
        key: Some(pb::Key {
            workspace_id: "acme".into(),
            key_id: key_id.clone(),
            scopes: vec!["orders:read".into()],
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["scopes".into()],
        }),
        ..Default::default()
    };
    after_event(&verifier, app.keys.update_key(narrow))
        .await
        .unwrap();
    let answer = verify(&verifier, &issued.secret, &["orders:write"]).await;
    assert_eq!(
        (answer.code, answer.local),
        (VerifyCode::InsufficientScope, false)
    );
    let answer = verify(&verifier, &issued.secret, &["orders:write"]).await;
    assert_eq!(answer.code, VerifyCode::InsufficientScope, "never cached");
    let answer = warm(&verifier, &issued.secret, &["orders:read"]).await;
    assert_eq!(answer.key.unwrap().scopes, ["orders:read"]);

    // A wrong secret for a known key id is never answered here: only a VALID answer for that
    // exact text fills the digest cache.
    let mut wrong = issued.secret.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    for _ in 0..2 {
        let answer = verify(&verifier, &wrong, &[]).await;
        assert!(!answer.is_valid());
        assert!(!answer.local);
    }
    // Neither is a key of a workspace the verifier does not watch.
    let other = app.issue("beta", "unwatched").await;
    for _ in 0..2 {
        let answer = verify(&verifier, &other.secret, &[]).await;
        assert_eq!((answer.code, answer.local), (VerifyCode::Valid, false));
    }
    // Nor a usage-limited key: every use must reach the authority.
    let limited = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "limited".into(),
            usage_limit: 3,
            ..Default::default()
        })
        .await;
    let codes: Vec<(VerifyCode, bool)> = {
        let mut codes = Vec::new();
        for _ in 0..4 {
            let answer = verify(&verifier, &limited.secret, &[]).await;
            codes.push((answer.code, answer.local));
        }
        codes
    };
    assert_eq!(
        codes,
        [
            (VerifyCode::Valid, false),
            (VerifyCode::Valid, false),
            (VerifyCode::Valid, false),
            (VerifyCode::UsageExhausted, false),
        ]
    );
    verifier.shutdown().await.unwrap();
    app.stop().await;
}

async fn a_cut_stream_drops_local_state_and_an_outage_is_unavailable(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let verifier = local_verifier(&app, Duration::from_secs(1)).await;
    let issued = app.issue("acme", "cut off").await;
    warm(&verifier, &issued.secret, &[]).await;
    assert_eq!(verifier.stats().cached_keys, 1);

    let mut status = verifier.status();
    app.stop().await;
    tokio::time::timeout(PATIENCE, status.wait_for(|status| status.breaks >= 1))
        .await
        .expect("the break is noticed")
        .unwrap();
    assert_eq!(verifier.stats().cached_keys, 0, "local state dropped");
    assert!(verifier.verify_local(&issued.secret, &[]).is_none());
    let error = verifier
        .verify(&issued.secret, &[], None)
        .await
        .expect_err("nobody can decide");
    assert_eq!(error.code(), Code::Unavailable);
    let _ = verifier.shutdown().await;
}

async fn usage_is_exact_after_a_graceful_shutdown(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let verifier = local_verifier(&app, Duration::from_secs(1)).await;
    let issued = app.issue("acme", "busy").await;
    let key_id = key_of(&issued).key_id.clone();
    // One remote verdict (counted by the server), then local ones.
    warm(&verifier, &issued.secret, &[]).await;
    for _ in 0..998 {
        assert!(
            verifier
                .verify_local(&issued.secret, &[])
                .unwrap()
                .is_valid()
        );
    }
    assert_eq!(verifier.unreported_usage().await, 999);
    assert_eq!(verifier.stats().local_answers, 999);

    verifier.shutdown().await.expect("every count reported");
    assert_eq!(verifier.unreported_usage().await, 0);
    assert_eq!(verifier.stats().usage_reported, 999);
    // The server's own write-behind (the one remote verdict).
    app.server.verifier.usage().flush().await.unwrap();
    let key = app.get("acme", &key_id).await.unwrap();
    assert_eq!(key.total_requests, 1000);
    assert!(key.last_used_time.is_some());
    app.stop().await;
}

on_both_databases!(
    narrowed_scopes_take_effect_locally,
    a_cut_stream_drops_local_state_and_an_outage_is_unavailable,
    usage_is_exact_after_a_graceful_shutdown,
);
