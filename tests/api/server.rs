//! Health checking and reflection are always on.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::common::{TestApp, TestDb, on_both_databases};

async fn health_reports_serving(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in [
        "",
        "keyauthority.v1.KeyService",
        "keyauthority.v1.VerifyService",
    ] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    app.stop().await;
}

async fn reflection_lists_every_service(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "keyauthority.v1.KeyService",
        "keyauthority.v1.VerifyService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // describe works without proto files: the file defining KeyService is served.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "keyauthority.v1.KeyService".into(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("expected file descriptors, got {response:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    drop(reflection);
    app.stop().await;
}

/// Python's grpcio-reflection and older tools speak only v1alpha.
async fn reflection_v1alpha_is_served_too(db: TestDb) {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1Alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;

    let app = TestApp::spawn(&db).await;
    let mut reflection = V1Alpha::new(app.channel.clone());
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(AlphaResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "keyauthority.v1.VerifyService")
    );
    drop(reflection);
    app.stop().await;
}

on_both_databases!(
    health_reports_serving,
    reflection_lists_every_service,
    reflection_v1alpha_is_served_too,
);
