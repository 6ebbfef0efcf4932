//! grpc.health: every service SERVING while the database answers, NOT_SERVING while it does not
//! (and from the moment a shutdown starts).

use std::sync::Arc;
use std::time::Duration;

use crate::grpc::{KeyServiceImpl, VerifyServiceImpl};
use crate::pb::key_service_server::KeyServiceServer;
use crate::pb::verify_service_server::VerifyServiceServer;
use crate::store::Store;

/// Every service is SERVING while the database answers, NOT_SERVING while it does not.
pub(super) async fn report(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <KeyServiceServer<KeyServiceImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <VerifyServiceServer<VerifyServiceImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Pings the database every `interval` and reports the health status when it changes.
pub(super) async fn watch_database(
    store: Arc<dyn Store>,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
) {
    let mut serving = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // A ping that takes longer than the interval counts as a failure, so NOT_SERVING comes
        // within two intervals however long the pool would wait; it opens the store's breaker
        // (a failed one does by itself), so calls fail fast from then on.
        let answered = match tokio::time::timeout(interval, store.ping()).await {
            Ok(answer) => answer.is_ok(),
            Err(_) => {
                if let Some(breaker) = store.breaker() {
                    breaker.trip("the health ping did not answer within the health interval");
                }
                false
            }
        };
        if answered != serving {
            serving = answered;
            if serving {
                tracing::info!("database reachable again: SERVING");
            } else {
                tracing::warn!("database unreachable: NOT_SERVING");
            }
            report(&reporter, serving).await;
        }
    }
}
