//! VerifyKeyLayer in front of a gRPC service and a plain HTTP service, against the real server.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use key_authority_client::{ERROR_DOMAIN, KeyAuthorityClient, VerifiedKey, VerifyKeyLayer, pb};
use tonic::Code;
use tower::{Layer as _, ServiceExt as _};

use crate::harness::{KeyAuthority, echo, echo_with_header, issue, reason, serve_echo};

fn refused_with(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, why: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        reason(&status),
        (why.to_owned(), ERROR_DOMAIN.to_owned()),
        "{status:?}"
    );
}

#[tokio::test]
async fn layer_protects_a_grpc_service() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (key_id, key) = issue(&admin, "acme", &["echo:call"], 0).await;
    let (_, other_scope) = issue(&admin, "acme", &["billing:read"], 0).await;
    let (_, full_access) = issue(&admin, "globex", &[], 0).await;
    let (_, metered) = issue(&admin, "acme", &["echo:call"], 1).await;

    let layer =
        VerifyKeyLayer::new(KeyAuthorityClient::connect_lazy(authority.url.clone()).unwrap())
            .require_scopes(["echo:call"]);
    let service = serve_echo(layer).await;

    // No key, a garbled header, not a key at all.
    refused_with(
        echo(service, None).await,
        Code::Unauthenticated,
        "MISSING_API_KEY",
    );
    refused_with(
        echo_with_header(service, Some("Basic dXNlcjpwYXNz")).await,
        Code::Unauthenticated,
        "MALFORMED_AUTH_HEADER",
    );
    refused_with(
        echo(service, Some("not-a-key")).await,
        Code::Unauthenticated,
        "API_KEY_MALFORMED",
    );

    // A valid key: the inner service sees the VerifiedKey and echoes its workspace.
    let answer = echo(service, Some(&key)).await.expect("a valid key passes");
    assert_eq!(answer.message, "hello");
    assert_eq!(answer.workspace_id, "acme");
    assert_eq!(answer.key_id, key_id);
    let answer = echo(service, Some(&full_access))
        .await
        .expect("full access");
    assert_eq!(answer.workspace_id, "globex");

    // Lacking the required scope.
    refused_with(
        echo(service, Some(&other_scope)).await,
        Code::PermissionDenied,
        "API_KEY_INSUFFICIENT_SCOPE",
    );

    // A usage limit of one: the second call is refused.
    echo(service, Some(&metered)).await.expect("the one use");
    refused_with(
        echo(service, Some(&metered)).await,
        Code::ResourceExhausted,
        "API_KEY_USAGE_EXHAUSTED",
    );

    // Revoked: refused on the very next call (no cache by default).
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id,
            ..Default::default()
        })
        .await
        .unwrap();
    refused_with(
        echo(service, Some(&key)).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );

    // key-authority stopped: UNAVAILABLE, never "invalid", even for a key that was valid.
    authority.stop().await;
    refused_with(
        echo(service, Some(&full_access)).await,
        Code::Unavailable,
        "KEY_AUTHORITY_UNAVAILABLE",
    );
}

/// A key disabled through UpdateKey is refused on the very next call, and passes once enabled.
#[tokio::test]
async fn layer_refuses_a_disabled_key() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let layer =
        VerifyKeyLayer::new(KeyAuthorityClient::connect_lazy(authority.url.clone()).unwrap())
            .require_scopes(["echo:call"]);
    let service = serve_echo(layer).await;

    let (switch_id, switch) = issue(&admin, "acme", &["echo:call"], 0).await;
    let set_enabled = |enabled: bool| {
        let admin = admin.clone();
        let key_id = switch_id.clone();
        async move {
            admin
                .update_key(pb::UpdateKeyRequest {
                    key: Some(pb::Key {
                        workspace_id: "acme".into(),
                        key_id,
                        enabled,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["enabled".into()],
                    }),
                    ..Default::default()
                })
                .await
                .expect("UpdateKey")
        }
    };
    set_enabled(false).await;
    refused_with(
        echo(service, Some(&switch)).await,
        Code::Unauthenticated,
        "API_KEY_DISABLED",
    );
    set_enabled(true).await;
    echo(service, Some(&switch)).await.expect("enabled again");

    authority.stop().await;
}

/// The same layer in front of a plain (non-gRPC) HTTP service answers with HTTP statuses.
#[tokio::test]
async fn layer_answers_http_statuses_to_plain_http() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (_, key) = issue(&admin, "acme", &["echo:call"], 0).await;
    let (_, other_scope) = issue(&admin, "acme", &["billing:read"], 0).await;
    let (_, metered) = issue(&admin, "acme", &[], 1).await;

    let layer =
        VerifyKeyLayer::new(KeyAuthorityClient::connect_lazy(authority.url.clone()).unwrap())
            .require_scopes(["echo:call"]);
    let service = layer.layer(tower::service_fn(
        |request: http::Request<String>| async move {
            let workspace = request
                .extensions()
                .get::<VerifiedKey>()
                .map(|key| key.workspace_id.clone())
                .unwrap_or_default();
            Ok::<_, Infallible>(http::Response::new(workspace))
        },
    ));
    let call = |key: Option<&str>| {
        let mut request = http::Request::builder().uri("/whoami");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        service
            .clone()
            .oneshot(request.body(String::new()).unwrap())
    };

    let response = call(None).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert!(!response.headers().contains_key("grpc-status"));

    let response = call(Some(&key)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.body(), "acme");

    let response = call(Some(&other_scope)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);

    assert_eq!(
        call(Some(&metered)).await.unwrap().status(),
        http::StatusCode::OK
    );
    let response = call(Some(&metered)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);

    // The same layer on an axum Router; handlers take the key as an Extension.
    async fn whoami(axum::Extension(key): axum::Extension<VerifiedKey>) -> String {
        key.workspace_id
    }
    let router = axum::Router::new()
        .route("/whoami", axum::routing::get(whoami))
        .layer(layer);
    let axum_call = |key: Option<&str>| {
        let mut request = http::Request::builder().uri("/whoami");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        router
            .clone()
            .oneshot(request.body(axum::body::Body::empty()).unwrap())
    };
    let response = axum_call(Some(&key)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"acme");
    let response = axum_call(None).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
    let response = axum_call(Some(&other_scope)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);

    authority.stop().await;
    let response = call(Some(&key)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let response = axum_call(Some(&key)).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
}

/// With the cache on, a repeated key does not reach key-authority (and a revoked key is accepted
/// until its entry expires, at most 5 s); with it off, every call does.
#[tokio::test]
async fn verdict_cache_saves_calls_and_is_capped_at_five_seconds() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (key_id, key) = issue(&admin, "acme", &["echo:call"], 0).await;
    let (_, other_scope) = issue(&admin, "acme", &["billing:read"], 0).await;

    let client = KeyAuthorityClient::connect_lazy(authority.url.clone()).unwrap();
    let uncached =
        serve_echo(VerifyKeyLayer::new(client.clone()).require_scopes(["echo:call"])).await;
    // Asks for a minute; the layer caps it at 5 s.
    let cached_layer = VerifyKeyLayer::new(client)
        .require_scopes(["echo:call"])
        .cache_valid_verdicts(Duration::from_secs(60), 1_000);
    let cached = serve_echo(cached_layer.clone()).await;

    // Cache off: every call reaches key-authority.
    let before = authority.verify_calls();
    echo(uncached, Some(&key)).await.unwrap();
    echo(uncached, Some(&key)).await.unwrap();
    assert_eq!(authority.verify_calls(), before + 2);

    // Cache on: the first call asks, the second is answered locally.
    let before = authority.verify_calls();
    let first_cached = Instant::now();
    echo(cached, Some(&key)).await.unwrap();
    assert_eq!(authority.verify_calls(), before + 1);
    let answer = echo(cached, Some(&key)).await.unwrap();
    assert_eq!(answer.workspace_id, "acme");
    assert_eq!(
        authority.verify_calls(),
        before + 1,
        "served from the cache"
    );

    // Refusals are never cached.
    for _ in 0..2 {
        refused_with(
            echo(cached, Some(&other_scope)).await,
            Code::PermissionDenied,
            "API_KEY_INSUFFICIENT_SCOPE",
        );
    }
    assert_eq!(authority.verify_calls(), before + 3);

    // The documented trade-off: revoked, yet accepted from the cache until the entry expires...
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id,
            ..Default::default()
        })
        .await
        .unwrap();
    refused_with(
        echo(uncached, Some(&key)).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    echo(cached, Some(&key))
        .await
        .expect("still cached as valid");
    // ...which is 5 s after it was cached, not the minute asked for.
    tokio::time::sleep_until((first_cached + Duration::from_millis(5_300)).into()).await;
    refused_with(
        echo(cached, Some(&key)).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    authority.stop().await;
}

/// `.local_verifier(...)`: one line, and warm keys never leave the process; a revocation is
/// refused as soon as its event arrives.
#[cfg(feature = "local-verifier")]
#[tokio::test]
async fn layer_with_a_local_verifier_answers_warm_keys_in_process() {
    use key_authority_client::LocalVerifier;

    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (key_id, key) = issue(&admin, "acme", &["echo:call"], 0).await;
    let verifier = LocalVerifier::builder(admin.clone())
        .workspaces(["acme"])
        .settle(Duration::ZERO)
        .start()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), verifier.wait_ready())
        .await
        .expect("the event stream connects");
    let layer = VerifyKeyLayer::new(admin.clone())
        .require_scopes(["echo:call"])
        .local_verifier(verifier.clone());
    let service = serve_echo(layer).await;

    let calls_before = authority.verify_calls();
    for _ in 0..3 {
        let answer = echo(service, Some(&key)).await.expect("a valid key passes");
        assert_eq!(answer.key_id, key_id);
    }
    assert_eq!(
        authority.verify_calls() - calls_before,
        1,
        "only the first call reached key-authority"
    );
    assert_eq!(verifier.stats().local_answers, 2);

    let mut status = verifier.status();
    let applied = status.borrow_and_update().events_applied;
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id,
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|status| status.events_applied > applied),
    )
    .await
    .expect("the revocation's event arrives")
    .unwrap();
    refused_with(
        echo(service, Some(&key)).await,
        Code::Unauthenticated,
        "API_KEY_REVOKED",
    );
    verifier.shutdown().await.unwrap();
}
