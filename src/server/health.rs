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
        // No timeout of our own around the ping: the pool's acquire timeout bounds it, and
        // cancelling connection attempts half-way can leave the pool short of connections.
        let answered = store.ping().await.is_ok();
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
