//! LocalVerifier against a real server that restarts: a break drops the local state, verifies go
//! remote (UNAVAILABLE while nobody answers), and local answers resume once the stream is back.
//! A key close to its expiry is never answered locally. (The replica, scope, usage and
//! revocation tests are in the server's suite, tests/api/local_verifier.rs.)

use std::time::Duration;

use key_authority_client::pb::{self, VerifyCode};
use key_authority_client::{KeyAuthorityClient, LocalVerifier};
use tonic::Code;

use crate::harness::{ADMIN_TOKEN, KeyAuthority, issue};

const PATIENCE: Duration = Duration::from_secs(20);

async fn verifier_of(authority: &KeyAuthority, expiry_margin: Duration) -> LocalVerifier {
    // connect_lazy: the verifier outlives the server it first talks to.
    let client = KeyAuthorityClient::connect_lazy(authority.url.clone())
        .unwrap()
        .with_bearer_token(ADMIN_TOKEN)
        .unwrap();
    let verifier = LocalVerifier::builder(client)
        .workspaces(["acme"])
        .settle(Duration::ZERO)
        .expiry_margin(expiry_margin)
        .start()
        .unwrap();
    tokio::time::timeout(PATIENCE, verifier.wait_ready())
        .await
        .expect("the event stream connects");
    verifier
}

async fn code_and_source(verifier: &LocalVerifier, key: &str) -> (VerifyCode, bool) {
    let answer = verifier.verify(key, &[], None).await.expect("an answer");
    (answer.code, answer.local)
}

#[tokio::test]
async fn local_answers_stop_at_a_break_and_resume_once_the_stream_is_back() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (_, key) = issue(&admin, "acme", &[], 0).await;
    let verifier = verifier_of(&authority, Duration::from_secs(1)).await;
    assert_eq!(
        code_and_source(&verifier, &key).await,
        (VerifyCode::Valid, false)
    );
    assert_eq!(
        code_and_source(&verifier, &key).await,
        (VerifyCode::Valid, true)
    );

    // A graceful restart on the same address and database: the stream ends, the state goes.
    let mut status = verifier.status();
    let authority = authority.restart().await;
    tokio::time::timeout(
        PATIENCE,
        status.wait_for(|status| status.breaks >= 1 && status.connects >= 2 && status.live),
    )
    .await
    .expect("the stream breaks and comes back")
    .unwrap();
    assert_eq!(verifier.stats().cached_keys, 0);
    assert_eq!(
        code_and_source(&verifier, &key).await,
        (VerifyCode::Valid, false),
        "the first verify after the break asks the authority"
    );
    assert_eq!(
        code_and_source(&verifier, &key).await,
        (VerifyCode::Valid, true)
    );

    // Stopped for good: remote only, and an outage is UNAVAILABLE.
    authority.stop().await;
    tokio::time::timeout(PATIENCE, status.wait_for(|status| status.breaks >= 2))
        .await
        .expect("the second break is noticed")
        .unwrap();
    let error = verifier.verify(&key, &[], None).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(verifier.verify_local(&key, &[]).is_none());
}

#[tokio::test]
async fn a_key_near_its_expiry_is_always_asked_remotely() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "short-lived".into(),
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 300,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    // Five minutes left is within a ten-minute margin: never local.
    let verifier = verifier_of(&authority, Duration::from_secs(600)).await;
    for _ in 0..3 {
        assert_eq!(
            code_and_source(&verifier, &issued.secret).await,
            (VerifyCode::Valid, false)
        );
    }
    // The same key with a one-second margin is cached.
    let relaxed = verifier_of(&authority, Duration::from_secs(1)).await;
    assert_eq!(
        code_and_source(&relaxed, &issued.secret).await,
        (VerifyCode::Valid, false)
    );
    assert_eq!(
        code_and_source(&relaxed, &issued.secret).await,
        (VerifyCode::Valid, true)
    );
    verifier.shutdown().await.unwrap();
    relaxed.shutdown().await.unwrap();
    authority.stop().await;
}
