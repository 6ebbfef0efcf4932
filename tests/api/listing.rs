//! ListKeys: pages, tokens, filters.

use std::collections::HashSet;

use key_authority::pb;
use tonic::Code;

use crate::common::{TestApp, TestDb, key_of, on_both_databases, reason};

async fn list(
    app: &mut TestApp,
    request: pb::ListKeysRequest,
) -> Result<pb::ListKeysResponse, tonic::Status> {
    app.keys
        .list_keys(request)
        .await
        .map(tonic::Response::into_inner)
}

fn page(workspace: &str, size: i32, token: &str) -> pb::ListKeysRequest {
    pb::ListKeysRequest {
        workspace_id: workspace.into(),
        page_size: size,
        page_token: token.into(),
        include_inactive: false,
    }
}

async fn pages_cover_every_key_once_newest_first(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut issued = Vec::new();
    for i in 0..7 {
        issued.push(
            key_of(&app.issue("acme", &format!("k{i}")).await)
                .key_id
                .clone(),
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut sizes = Vec::new();
    loop {
        let response = list(&mut app, page("acme", 3, &token)).await.unwrap();
        assert_eq!(response.total_size, 7);
        sizes.push(response.keys.len());
        seen.extend(response.keys.iter().map(|k| k.key_id.clone()));
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }
    assert_eq!(sizes, [3, 3, 1]);
    issued.reverse();
    assert_eq!(seen, issued, "newest first, each key once");
    app.stop().await;
}

async fn paging_is_stable_under_concurrent_inserts(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut before = HashSet::new();
    for i in 0..6 {
        before.insert(
            key_of(&app.issue("acme", &format!("old{i}")).await)
                .key_id
                .clone(),
        );
    }
    let first = list(&mut app, page("acme", 3, "")).await.unwrap();
    for i in 0..4 {
        app.issue("acme", &format!("new{i}")).await;
    }
    let second = list(&mut app, page("acme", 3, &first.next_page_token))
        .await
        .unwrap();
    let seen: Vec<String> = first
        .keys
        .iter()
        .chain(second.keys.iter())
        .map(|k| k.key_id.clone())
        .collect();
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "no key twice");
    assert_eq!(
        unique, before,
        "exactly the keys that existed when paging began"
    );
    assert_eq!(second.next_page_token, "");
    app.stop().await;
}

async fn inactive_keys_are_hidden_unless_asked_for(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let active = app.issue("acme", "active").await;
    let revoked = app.issue("acme", "revoked").await;
    app.revoke("acme", &key_of(&revoked).key_id).await.unwrap();
    let expired = app.issue("acme", "expired").await;
    app.rotate(
        "acme",
        &key_of(&expired).key_id,
        Some(prost_types::Duration::default()),
    )
    .await
    .unwrap(); // the old key expires now; its successor is active

    let default = list(&mut app, page("acme", 0, "")).await.unwrap();
    let ids: HashSet<String> = default.keys.iter().map(|k| k.key_id.clone()).collect();
    assert_eq!(default.total_size, 2);
    assert!(ids.contains(&key_of(&active).key_id));
    assert!(!ids.contains(&key_of(&revoked).key_id));
    assert!(!ids.contains(&key_of(&expired).key_id));

    let all = list(
        &mut app,
        pb::ListKeysRequest {
            include_inactive: true,
            ..page("acme", 0, "")
        },
    )
    .await
    .unwrap();
    assert_eq!(all.total_size, 4);
    let states: HashSet<i32> = all.keys.iter().map(|k| k.state).collect();
    assert_eq!(
        states,
        HashSet::from([
            pb::KeyState::Active as i32,
            pb::KeyState::Revoked as i32,
            pb::KeyState::Expired as i32
        ])
    );
    app.stop().await;
}

async fn bad_page_requests_are_invalid_argument(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    for i in 0..3 {
        app.issue("acme", &format!("k{i}")).await;
        app.issue("other", &format!("k{i}")).await;
    }
    let status = list(&mut app, page("acme", -1, "")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("page_size"));

    let token = list(&mut app, page("acme", 1, ""))
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());
    let foreign = list(&mut app, page("other", 1, &token)).await.unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert_eq!(reason(&foreign), "INVALID_PAGE_TOKEN");

    let flag_changed = list(
        &mut app,
        pb::ListKeysRequest {
            include_inactive: true,
            ..page("acme", 1, &token)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(flag_changed.code(), Code::InvalidArgument);

    let mut forged = token.clone();
    forged.replace_range(2..3, if &token[2..3] == "A" { "B" } else { "A" });
    for bad in [forged.as_str(), "garbage", "AAAA"] {
        let status = list(&mut app, page("acme", 1, bad)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(reason(&status), "INVALID_PAGE_TOKEN");
    }

    let status = list(&mut app, page("", 1, "")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("workspace_id"));

    // Oversized pages are capped, not refused.
    let capped = list(&mut app, page("acme", 5000, "")).await.unwrap();
    assert_eq!(capped.keys.len(), 3);
    app.stop().await;
}

on_both_databases!(
    pages_cover_every_key_once_newest_first,
    paging_is_stable_under_concurrent_inserts,
    inactive_keys_are_hidden_unless_asked_for,
    bad_page_requests_are_invalid_argument,
);
