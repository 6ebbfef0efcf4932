//! The webhook part of the `Store` conformance suite, straight through the trait on both
//! databases: leases are exclusive and run out, a lost lease writes nothing, concurrent claims
//! never share a webhook, the per-workspace limit, cascading deletes, and pruning.

use std::collections::HashSet;

use key_authority::events::{EventQuery, KeyEvent};
use key_authority::store::Store;
use key_authority::webhooks::model::{
    Attempt, AttemptResult, DeliveryQuery, DeliveryState, Lease, Webhook,
};

use crate::common::{TestDb, on_both_databases};
use crate::store::{NOW, SECOND, insert, new_key, open};

on_both_databases!(
    leases_are_exclusive_and_run_out,
    concurrent_claims_never_share_a_webhook,
    webhooks_are_limited_per_workspace_and_deleted_with_their_deliveries,
    finished_deliveries_are_pruned,
);

fn webhook(workspace_id: &str) -> Webhook {
    Webhook {
        webhook_id: uuid::Uuid::new_v4().to_string(),
        workspace_id: workspace_id.into(),
        url: "https://hooks.example/k".into(),
        event_types: vec!["key.issued".into()],
        description: String::new(),
        create_time: NOW,
        created_by: "admin".into(),
        secret_check: "0123456789abcdef".into(),
    }
}

fn lease(webhook: &Webhook, owner: &str) -> Lease {
    Lease {
        webhook_id: webhook.webhook_id.clone(),
        owner: owner.into(),
    }
}

fn attempt(number: i32, status: i32, at: i64) -> Attempt {
    Attempt {
        attempt: number,
        attempt_time: at,
        http_status: status,
        error: if status == 200 {
            String::new()
        } else {
            format!("HTTP {status}")
        },
        duration_micros: 1000,
    }
}

async fn events_of(store: &dyn Store, workspace_id: &str) -> Vec<KeyEvent> {
    store
        .list_key_events(&EventQuery {
            workspace_id: Some(workspace_id.into()),
            after: 0,
            limit: 100,
        })
        .await
        .unwrap()
}

async fn claim(store: &dyn Store, owner: &str, now: i64) -> Vec<String> {
    store
        .webhooks()
        .claim_webhooks(owner, now, now + 10 * SECOND, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|claimed| claimed.webhook.webhook_id)
        .collect()
}

async fn leases_are_exclusive_and_run_out(db: TestDb) {
    let store = open(&db).await;
    let hooks = store.webhooks();
    let hook = webhook("acme");
    assert!(hooks.insert_webhook(&hook, 16).await.unwrap());
    // Nothing to send yet: no event after its start, nothing pending.
    assert!(claim(store.as_ref(), "a", NOW).await.is_empty());
    insert(store.as_ref(), &new_key("acme", NOW, 0)).await;
    let event = events_of(store.as_ref(), "acme").await.pop().unwrap();

    let claimed = hooks
        .claim_webhooks("a", NOW, NOW + 10 * SECOND, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].webhook, hook);
    let start = claimed[0].cursor;
    assert!(start < event.position);
    // Leased: nobody else gets it until the lease runs out.
    assert!(claim(store.as_ref(), "b", NOW + SECOND).await.is_empty());
    assert_eq!(
        claim(store.as_ref(), "b", NOW + 11 * SECOND).await,
        std::slice::from_ref(&hook.webhook_id)
    );

    // The first holder lost it: it can neither queue nor record.
    let (a, b) = (lease(&hook, "a"), lease(&hook, "b"));
    let events = std::slice::from_ref(&event);
    let later = NOW + 20 * SECOND;
    assert!(
        !hooks
            .queue_deliveries(&a, start, event.position, events, NOW, later)
            .await
            .unwrap()
    );
    assert!(
        hooks
            .queue_deliveries(&b, start, event.position, events, NOW, later)
            .await
            .unwrap()
    );
    // A cursor that moved on is not moved again from where it was.
    assert!(
        !hooks
            .queue_deliveries(&b, start, event.position, events, NOW, later)
            .await
            .unwrap()
    );
    let delivery = hooks
        .next_delivery(&hook.webhook_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event_id, event.event_id);
    assert_eq!(delivery.state, DeliveryState::Pending);
    assert_eq!(delivery.attempt_count, 0);
    assert!(!delivery.redelivery);

    let retry_at = NOW + 30 * SECOND;
    assert!(
        !hooks
            .record_attempt(
                &a,
                &delivery,
                &attempt(1, 500, NOW),
                AttemptResult::RetryAt(retry_at),
                later
            )
            .await
            .unwrap()
    );
    assert!(
        hooks
            .record_attempt(
                &b,
                &delivery,
                &attempt(1, 500, NOW + SECOND),
                AttemptResult::RetryAt(retry_at),
                later
            )
            .await
            .unwrap()
    );
    let pending = hooks
        .next_delivery(&hook.webhook_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.attempt_count, 1);
    assert_eq!(pending.first_attempt_time, Some(NOW + SECOND));
    assert_eq!(pending.next_attempt_time, Some(retry_at));

    // Released until the retry is due: not claimed before.
    hooks.release_webhook(&b, retry_at).await.unwrap();
    assert!(
        claim(store.as_ref(), "c", retry_at - SECOND)
            .await
            .is_empty()
    );
    // A new event is queued at once all the same (retry periods count from queueing).
    insert(store.as_ref(), &new_key("acme", NOW, 0)).await;
    let newer = events_of(store.as_ref(), "acme").await.pop().unwrap();
    assert_eq!(
        claim(store.as_ref(), "q", retry_at - SECOND).await,
        std::slice::from_ref(&hook.webhook_id)
    );
    let q = lease(&hook, "q");
    let newer_events = std::slice::from_ref(&newer);
    assert!(
        hooks
            .queue_deliveries(
                &q,
                event.position,
                newer.position,
                newer_events,
                NOW,
                retry_at
            )
            .await
            .unwrap()
    );
    hooks.release_webhook(&q, retry_at).await.unwrap();
    assert!(
        claim(store.as_ref(), "c", retry_at - SECOND)
            .await
            .is_empty()
    );
    assert_eq!(
        claim(store.as_ref(), "c", retry_at).await,
        std::slice::from_ref(&hook.webhook_id)
    );
    let c = lease(&hook, "c");
    assert!(
        hooks
            .record_attempt(
                &c,
                &pending,
                &attempt(2, 200, retry_at),
                AttemptResult::Delivered,
                retry_at + SECOND
            )
            .await
            .unwrap()
    );
    // The oldest pending one is next: the newer event's.
    let next = hooks
        .next_delivery(&hook.webhook_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.event_id, newer.event_id);
    assert!(
        hooks
            .record_attempt(
                &c,
                &next,
                &attempt(1, 200, retry_at),
                AttemptResult::Delivered,
                retry_at + SECOND
            )
            .await
            .unwrap()
    );
    assert_eq!(hooks.next_delivery(&hook.webhook_id).await.unwrap(), None);
    hooks.release_webhook(&c, retry_at).await.unwrap();
    // Nothing left to do: not claimed.
    assert!(
        claim(store.as_ref(), "d", retry_at + 60 * SECOND)
            .await
            .is_empty()
    );

    let listed = hooks
        .list_deliveries(&DeliveryQuery {
            webhook_id: hook.webhook_id.clone(),
            state: None,
            before_delivery_id: i64::MAX,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].state, DeliveryState::Succeeded);
    assert_eq!(
        listed[1].attempts,
        [attempt(1, 500, NOW + SECOND), attempt(2, 200, retry_at)],
        "the lost lease's attempt was not recorded"
    );
    store.close().await;
}

async fn concurrent_claims_never_share_a_webhook(db: TestDb) {
    let store = open(&db).await;
    let mut all = HashSet::new();
    for _ in 0..12 {
        let hook = webhook("acme");
        store.webhooks().insert_webhook(&hook, 100).await.unwrap();
        all.insert(hook.webhook_id);
    }
    insert(store.as_ref(), &new_key("acme", NOW, 0)).await;
    let (first, second) = tokio::join!(
        claim(store.as_ref(), "a", NOW),
        claim(store.as_ref(), "b", NOW)
    );
    let first: HashSet<String> = first.into_iter().collect();
    let second: HashSet<String> = second.into_iter().collect();
    assert!(first.is_disjoint(&second), "a webhook claimed twice");
    assert_eq!(&first | &second, all, "every webhook with work is claimed");
    store.close().await;
}

async fn webhooks_are_limited_per_workspace_and_deleted_with_their_deliveries(db: TestDb) {
    let store = open(&db).await;
    let hooks = store.webhooks();
    let first = webhook("acme");
    assert!(hooks.insert_webhook(&first, 2).await.unwrap());
    assert!(hooks.insert_webhook(&webhook("acme"), 2).await.unwrap());
    assert!(!hooks.insert_webhook(&webhook("acme"), 2).await.unwrap());
    assert!(hooks.insert_webhook(&webhook("globex"), 2).await.unwrap());
    assert_eq!(hooks.list_webhooks("acme").await.unwrap().len(), 2);

    insert(store.as_ref(), &new_key("acme", NOW, 0)).await;
    let event = events_of(store.as_ref(), "acme").await.pop().unwrap();
    let queued = hooks
        .queue_redelivery(&first.webhook_id, &event, NOW, 100)
        .await
        .unwrap()
        .unwrap();
    assert!(queued.redelivery);
    // Pending redeliveries are capped.
    assert_eq!(
        hooks
            .queue_redelivery(&first.webhook_id, &event, NOW, 1)
            .await
            .unwrap(),
        None
    );
    assert!(
        hooks
            .queue_redelivery(&first.webhook_id, &event, NOW, 2)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        hooks.find_event("acme", &event.event_id).await.unwrap(),
        Some(event.clone())
    );
    assert_eq!(
        hooks.find_event("globex", &event.event_id).await.unwrap(),
        None
    );
    assert_eq!(hooks.event_at(event.position).await.unwrap(), Some(event));

    // Another workspace cannot delete it; its own can, deliveries and all.
    assert_eq!(
        hooks
            .delete_webhook("globex", &first.webhook_id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        hooks
            .delete_webhook("acme", &first.webhook_id)
            .await
            .unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        hooks.get_webhook("acme", &first.webhook_id).await.unwrap(),
        None
    );
    assert_eq!(hooks.next_delivery(&first.webhook_id).await.unwrap(), None);
    // Room for one more now.
    assert!(hooks.insert_webhook(&webhook("acme"), 2).await.unwrap());
    store.close().await;
}

async fn finished_deliveries_are_pruned(db: TestDb) {
    let store = open(&db).await;
    let hooks = store.webhooks();
    let hook = webhook("acme");
    hooks.insert_webhook(&hook, 16).await.unwrap();
    insert(store.as_ref(), &new_key("acme", NOW, 0)).await;
    let event = events_of(store.as_ref(), "acme").await.pop().unwrap();
    let old_done = hooks
        .queue_redelivery(&hook.webhook_id, &event, NOW - 100 * SECOND, 100)
        .await
        .unwrap()
        .unwrap();
    let old_pending = hooks
        .queue_redelivery(&hook.webhook_id, &event, NOW - 100 * SECOND, 100)
        .await
        .unwrap()
        .unwrap();
    let new_done = hooks
        .queue_redelivery(&hook.webhook_id, &event, NOW, 100)
        .await
        .unwrap()
        .unwrap();
    let holder = lease(&hook, "pruner");
    hooks
        .claim_webhooks("pruner", NOW, NOW + SECOND, 1)
        .await
        .unwrap();
    for delivery in [&old_done, &new_done] {
        assert!(
            hooks
                .record_attempt(
                    &holder,
                    delivery,
                    &attempt(1, 200, NOW),
                    AttemptResult::Delivered,
                    NOW + SECOND
                )
                .await
                .unwrap()
        );
    }
    assert_eq!(
        hooks
            .delete_finished_deliveries(NOW - 50 * SECOND, 10)
            .await
            .unwrap(),
        1
    );
    let left: Vec<i64> = hooks
        .list_deliveries(&DeliveryQuery {
            webhook_id: hook.webhook_id.clone(),
            state: None,
            before_delivery_id: i64::MAX,
            limit: 10,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|delivery| delivery.delivery_id)
        .collect();
    assert_eq!(left, [new_done.delivery_id, old_pending.delivery_id]);
    store.close().await;
}
