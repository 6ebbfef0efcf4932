//! WatchKeyEvents through the typed stream: stored then live events, a reconnection after the
//! last position, every workspace for an admin, EVENTS_PRUNED, and a resuming watch carried
//! across a server restart.

use std::collections::BTreeSet;
use std::time::Duration;

use key_authority_client::{Error, KeyAuthorityClient, KeyEventStream, pb};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::harness::{KeyAuthority, issue};

/// Longer than any event takes to arrive; only stops a broken test from hanging.
const WAIT: Duration = Duration::from_secs(15);

/// The stream's next event; fails on an error, an end or a wait past WAIT.
async fn next_event(events: &mut KeyEventStream) -> pb::KeyEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event within the wait")
        .expect("the watch goes on")
        .expect("an event, not an error")
}

fn watch(workspace: &str, after_position: i64) -> pb::WatchKeyEventsRequest {
    pb::WatchKeyEventsRequest {
        workspace_id: workspace.into(),
        after_position,
        ..Default::default()
    }
}

async fn rotate(admin: &KeyAuthorityClient, workspace: &str, key_id: &str) -> String {
    admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: workspace.into(),
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .expect("RotateKey")
        .key
        .expect("the successor")
        .key_id
}

#[tokio::test]
async fn stored_then_live_events_and_a_reconnection_after_the_last_position() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (key_id, _) = issue(&admin, "acme", &[], 0).await;

    // From 0: the stored key.issued.
    let mut from_start = admin.watch_key_events(watch("acme", 0)).await.unwrap();
    assert_eq!(from_start.last_position(), None);
    let issued = next_event(&mut from_start).await;
    assert_eq!(issued.r#type, "key.issued");
    assert_eq!(issued.key_id, key_id);
    assert_eq!(issued.workspace_id, "acme");
    assert!(issued.position > 0);
    assert!(!issued.event_id.is_empty());
    assert!(issued.event_time.is_some());
    assert_eq!(
        issued.actor.as_ref().map(|actor| actor.kind()),
        Some(pb::ActorKind::Admin)
    );
    assert_eq!(from_start.last_position(), Some(issued.position));

    // From now: only what commits after the watch began, here a rotation with both key ids.
    let mut from_now = admin
        .watch_key_events(pb::WatchKeyEventsRequest {
            workspace_id: "acme".into(),
            from_now: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let successor = rotate(&admin, "acme", &key_id).await;
    let rotated = next_event(&mut from_now).await;
    assert_eq!(rotated.r#type, "key.rotated");
    assert_eq!(rotated.key_id, key_id);
    assert_eq!(rotated.new_key_id, successor);
    assert!(rotated.old_key_expire_time.is_some());
    assert!(rotated.position > issued.position);
    // The watch from 0 follows it live too, as the same event.
    let live = next_event(&mut from_start).await;
    assert_eq!(live, rotated);
    drop(from_start);
    drop(from_now);

    // Reconnecting after the last position processed: only what came later.
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: successor.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut resumed = admin
        .watch_key_events(watch("acme", rotated.position))
        .await
        .unwrap();
    let revoked = next_event(&mut resumed).await;
    assert_eq!(revoked.r#type, "key.revoked");
    assert_eq!(revoked.key_id, successor);
    assert!(revoked.position > rotated.position);

    drop(resumed);
    authority.stop().await;
}

#[tokio::test]
async fn an_admin_watches_every_workspace_and_a_workspace_key_only_its_own() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (east_key, _) = issue(&admin, "east", &[], 0).await;
    let (west_key, _) = issue(&admin, "west", &[], 0).await;

    let mut everything = admin
        .watch_key_events(pb::WatchKeyEventsRequest {
            all_workspaces: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let first = next_event(&mut everything).await;
    let second = next_event(&mut everything).await;
    assert!(first.position < second.position);
    let seen: BTreeSet<_> = [first, second]
        .into_iter()
        .map(|event| (event.workspace_id, event.key_id, event.r#type))
        .collect();
    let expected: BTreeSet<_> = [
        ("east".to_owned(), east_key, "key.issued".to_owned()),
        ("west".to_owned(), west_key.clone(), "key.issued".to_owned()),
    ]
    .into_iter()
    .collect();
    assert_eq!(seen, expected);

    // An account admin's API key: its own workspace, never every one.
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "west".into(),
            name: "west admin".into(),
            role: pb::Role::AccountAdmin.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let west_admin = KeyAuthorityClient::connect(authority.url.clone())
        .await
        .unwrap()
        .with_bearer_token(&issued.secret)
        .unwrap();
    let refused = west_admin
        .watch_key_events(pb::WatchKeyEventsRequest {
            all_workspaces: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let mut own = west_admin.watch_key_events(watch("", 0)).await.unwrap();
    let event = next_event(&mut own).await;
    assert_eq!(
        (event.workspace_id.as_str(), event.key_id),
        ("west", west_key)
    );

    drop((everything, own));
    authority.stop().await;
}

#[tokio::test]
async fn a_start_before_the_oldest_kept_event_is_events_pruned() {
    let authority = KeyAuthority::start_with(|config| {
        // Events are pruned as soon as the pruning (on the audit pruning's schedule) runs.
        config.events.retention = Duration::from_millis(1);
        config.audit.prune_interval = Duration::from_millis(50);
    })
    .await;
    let admin = authority.admin().await;
    issue(&admin, "acme", &[], 0).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let pruned: Error = loop {
        match admin.watch_key_events(watch("acme", 0)).await {
            Err(error) => break error,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => panic!("the events were never pruned"),
        }
    };
    assert!(pruned.is_events_pruned(), "{pruned}");
    assert_eq!(pruned.code(), Code::OutOfRange);
    assert_eq!(pruned.reason(), Some(Error::EVENTS_PRUNED));
    assert!(!pruned.is_retryable());
    assert!(pruned.message().contains("position"), "{pruned}");

    // A resuming watch does not retry it: it yields the error once, and ends.
    let mut resuming = admin.watch_key_events_resuming(watch("acme", 0));
    let error = tokio::time::timeout(WAIT, resuming.next())
        .await
        .unwrap()
        .expect("an item")
        .expect_err("EVENTS_PRUNED");
    assert!(error.is_events_pruned(), "{error}");
    assert!(resuming.next().await.is_none());

    authority.stop().await;
}

#[tokio::test]
async fn a_resuming_watch_carries_on_across_a_server_restart() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let (before, _) = issue(&admin, "acme", &[], 0).await;

    let mut resuming = admin.watch_key_events_resuming(watch("acme", 0));
    let mut plain = admin.watch_key_events(watch("acme", 0)).await.unwrap();
    let first = next_event(&mut resuming).await;
    assert_eq!(
        (first.r#type.as_str(), first.key_id.as_str()),
        ("key.issued", before.as_str())
    );
    assert_eq!(next_event(&mut plain).await, first);

    // The server shuts down (ending every watch cleanly) and comes back on the same address and
    // database.
    let authority = authority.restart().await;
    let (after, _) = issue(&authority.admin().await, "acme", &[], 0).await;

    // The plain watch ended with its call.
    let end = tokio::time::timeout(WAIT, plain.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    // The resuming one watched again after the last position it delivered: the new event, and
    // not the first one again.
    let second = next_event(&mut resuming).await;
    assert_eq!(
        (second.r#type.as_str(), second.key_id.as_str()),
        ("key.issued", after.as_str())
    );
    assert!(second.position > first.position);
    assert_eq!(resuming.last_position(), Some(second.position));

    // And again, live, on the same stream.
    let successor = rotate(&authority.admin().await, "acme", &after).await;
    let third = next_event(&mut resuming).await;
    assert_eq!(
        (third.r#type.as_str(), third.new_key_id.as_str()),
        ("key.rotated", successor.as_str())
    );

    drop(resuming);
    authority.stop().await;
}
