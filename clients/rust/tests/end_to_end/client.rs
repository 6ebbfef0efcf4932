//! KeyAuthorityClient: every RPC, and the decoded error details.

use std::time::Duration;

use key_authority_client::{KeyAuthorityClient, pb};
use tonic::Code;

use crate::harness::{ADMIN_TOKEN, KeyAuthority, issue};

#[tokio::test]
async fn typed_client_lifecycle() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;

    // Issue, read, list.
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "billing worker".into(),
            scopes: vec!["payments:read".into(), "payments:write".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let key = issued.key.unwrap();
    assert_eq!(key.workspace_id, "acme");
    assert_eq!(key.state(), pb::KeyState::Active);
    assert!(issued.secret.starts_with(&key.prefix));
    let got = admin
        .get_key(pb::GetKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(got.name, "billing worker");
    let listed = admin
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.total_size, 1);
    assert_eq!(listed.keys[0].key_id, key.key_id);

    // Verify: valid, and a normal refusal for a missing scope.
    let verdict = admin
        .verify_key(pb::VerifyKeyRequest {
            key: issued.secret.clone(),
            required_scopes: vec!["payments:read".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(verdict.valid);
    assert_eq!(verdict.code(), pb::VerifyCode::Valid);
    assert_eq!(verdict.key.unwrap().key_id, key.key_id);
    let verdict = admin
        .verify_key(pb::VerifyKeyRequest {
            key: issued.secret.clone(),
            required_scopes: vec!["admin:everything".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!verdict.valid);
    assert_eq!(verdict.code(), pb::VerifyCode::InsufficientScope);

    // Rotate with no grace: the old key expires now, the new one verifies.
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let successor = rotated.key.unwrap();
    assert_eq!(successor.rotated_from_key_id, key.key_id);
    assert_eq!(
        rotated.previous_key.unwrap().rotated_to_key_id,
        successor.key_id
    );
    let code = |key: String| {
        let admin = admin.clone();
        async move {
            admin
                .verify_key(pb::VerifyKeyRequest {
                    key,
                    ..Default::default()
                })
                .await
                .unwrap()
                .code()
        }
    };
    assert_eq!(code(issued.secret.clone()).await, pb::VerifyCode::Expired);
    assert_eq!(code(rotated.secret.clone()).await, pb::VerifyCode::Valid);

    // Rotating again is refused with a stable reason.
    let error = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: "acme".into(),
            key_id: key.key_id.clone(),
            grace_period: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        matches!(error.reason(), Some("KEY_ALREADY_ROTATED" | "KEY_EXPIRED")),
        "{error}"
    );

    // Revoke.
    let revoked = admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: successor.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(revoked.state(), pb::KeyState::Revoked);
    assert_eq!(revoked.revoked_by, "admin");
    assert_eq!(code(rotated.secret.clone()).await, pb::VerifyCode::Revoked);

    // Errors carry the code and the ErrorInfo reason.
    let error = admin
        .get_key(pb::GetKeyRequest {
            workspace_id: "acme".into(),
            key_id: "AAAAAAAAAAAA".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(error.reason(), Some("KEY_NOT_FOUND"));
    assert_eq!(error.error_info().unwrap().domain, "keyauthority.v1");
    let anonymous = KeyAuthorityClient::connect(authority.url.clone())
        .await
        .unwrap();
    let error = anonymous
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert_eq!(error.reason(), Some("MISSING_AUTH_HEADER"));
    let error = anonymous
        .clone()
        .with_bearer_token("not-the-admin-token")
        .unwrap()
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated);
    assert_eq!(error.reason(), Some("INVALID_CREDENTIALS"));

    // Trial keys need no credentials.
    let trial = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap();
    let trial_key = trial.key.unwrap();
    assert_eq!(trial_key.environment(), pb::Environment::Trial);
    assert_eq!(code(trial.secret.clone()).await, pb::VerifyCode::Valid);
    let revoked = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: trial_key.prefix.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(revoked.key.unwrap().state(), pb::KeyState::Revoked);
    assert_eq!(code(trial.secret).await, pb::VerifyCode::Revoked);

    // The client never prints its token, and refuses one that cannot be a header.
    assert!(!format!("{admin:?}").contains(ADMIN_TOKEN));
    let error = anonymous.clone().with_bearer_token("tök\nen").unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);

    authority.stop().await;
}

#[tokio::test]
async fn rotate_with_a_new_expiry_then_revoke_the_chain() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (original_id, _) = issue(&admin, "acme", &[], 0).await;
    let renewed = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: "acme".into(),
            key_id: original_id.clone(),
            grace_period: Some(prost_types::Duration::default()),
            expiration: Some(pb::rotate_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 7200,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    let successor = renewed.key.unwrap();
    let lifetime = successor.expire_time.unwrap().seconds - successor.create_time.unwrap().seconds;
    assert_eq!(lifetime, 7200);

    let chain = admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: original_id,
            revoke_successors: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(chain.key.unwrap().state(), pb::KeyState::Revoked);
    let successors: Vec<_> = chain
        .successors
        .iter()
        .map(|key| (key.key_id.clone(), key.state()))
        .collect();
    assert_eq!(
        successors,
        vec![(successor.key_id.clone(), pb::KeyState::Revoked)]
    );
    let verdict = admin
        .verify_key(pb::VerifyKeyRequest {
            key: renewed.secret,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(verdict.code(), pb::VerifyCode::Revoked);
    authority.stop().await;
}

#[tokio::test]
async fn rate_limit_refusal_decodes_error_info_and_retry_info() {
    let authority = KeyAuthority::start().await;
    let anonymous = KeyAuthorityClient::connect(authority.url.clone())
        .await
        .unwrap();
    // Five trial keys a minute per client IP (the default); the sixth is refused.
    for _ in 0..5 {
        anonymous
            .issue_trial_key(pb::IssueTrialKeyRequest::default())
            .await
            .expect("within the limit");
    }
    let error = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
    assert_eq!(error.reason(), Some("IP_RATE_LIMITED"));
    assert_eq!(error.error_info().unwrap().domain, "keyauthority.v1");
    let delay = error.retry_delay().expect("a RetryInfo delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    assert!(error.is_retryable());
    authority.stop().await;
}

#[tokio::test]
async fn verify_token_is_sent_on_verify_key_only() {
    let authority = KeyAuthority::start_with(|config| {
        config.auth.verify_tokens = vec!["verify-service-token-0123456789".into()];
    })
    .await;
    let admin = authority.admin().await;
    let (_, key) = issue(&admin, "acme", &[], 0).await;
    let request = pb::VerifyKeyRequest {
        key,
        ..Default::default()
    };
    // The admin token is a KeyService credential; VerifyKey wants a verify token.
    let error = admin.verify_key(request.clone()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "{error}");
    let verifier = admin
        .clone()
        .with_verify_token("verify-service-token-0123456789")
        .unwrap();
    let verdict = verifier.verify_key(request).await.unwrap();
    assert_eq!(verdict.code(), pb::VerifyCode::Valid);
    authority.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let authority = KeyAuthority::start().await;
    let url = authority.url.clone();
    authority.stop().await;
    let error = KeyAuthorityClient::connect(url.clone()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    let lazy = KeyAuthorityClient::connect_lazy(url).unwrap();
    let error = lazy
        .verify_key(pb::VerifyKeyRequest {
            key: "ka_live_x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn report_usage_counts_a_batch_once() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (key_id, _) = issue(&admin, "acme", &[], 0).await;
    let used = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 60;
    let batch = pb::ReportUsageRequest {
        workspace_id: "acme".into(),
        request_id: "5f0b1c1e-0000-4000-8000-000000000001".into(),
        usage: vec![pb::KeyUsage {
            key_id: key_id.clone(),
            requests: 42,
            last_used_time: Some(prost_types::Timestamp {
                seconds: used,
                nanos: 0,
            }),
        }],
    };
    let first = admin.report_usage(batch.clone()).await.unwrap();
    assert_eq!((first.replayed, first.counted_keys), (false, 1));
    let retry = admin.report_usage(batch.clone()).await.unwrap();
    assert_eq!((retry.replayed, retry.counted_keys), (true, 0));

    let mut reused = batch;
    reused.usage[0].requests = 43;
    let error = admin.report_usage(reused).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.is_idempotency_key_reused());

    let key = admin
        .get_key(pb::GetKeyRequest {
            workspace_id: "acme".into(),
            key_id,
        })
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(key.total_requests, 42);
    assert_eq!(key.last_used_time.map(|at| at.seconds), Some(used));
}
