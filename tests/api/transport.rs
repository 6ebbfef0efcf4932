//! VerifyService callers: open by default, a service token when configured, TLS and mutual TLS.

use key_authority::pb;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use key_authority::server::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{Bearer, TestApp, TestDb, code, reason, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_tokens_gate_verify_key_when_configured() {
    let db = TestDb::sqlite().await;
    let mut config = test_config(&db);
    config.auth.verify_tokens = vec!["svc-token-a".into(), "svc-token-b".into()];
    let mut app = TestApp::spawn_with(config).await;
    let issued = app.issue("acme", "k").await;
    let request = || pb::VerifyKeyRequest {
        key: issued.secret.clone(),
        ..Default::default()
    };
    let mut anonymous =
        VerifyServiceClient::with_interceptor(app.channel.clone(), Bearer::new(None));
    let status = anonymous.verify_key(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "MISSING_AUTH_HEADER");
    let mut wrong = VerifyServiceClient::with_interceptor(
        app.channel.clone(),
        Bearer::new(Some("svc-token-c")),
    );
    let status = wrong.verify_key(request()).await.unwrap_err();
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    for token in ["svc-token-a", "svc-token-b"] {
        let mut client =
            VerifyServiceClient::with_interceptor(app.channel.clone(), Bearer::new(Some(token)));
        let verdict = client.verify_key(request()).await.unwrap().into_inner();
        assert_eq!(code(&verdict), pb::VerifyCode::Valid);
    }
    app.stop().await;
}

struct Pki {
    ca_pem: String,
    server: TlsConfig,
    client_cert_pem: String,
    client_key_pem: String,
}

fn pki(mutual: bool) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert_pem, client_key_pem) = leaf("billing-service");
    Pki {
        ca_pem: ca.pem(),
        server: TlsConfig {
            cert_pem: server_cert.into_bytes(),
            key_pem: server_key.into_bytes(),
            client_ca_pem: mutual.then(|| ca.pem().into_bytes()),
        },
        client_cert_pem,
        client_key_pem,
    }
}

/// A TLS server and its database, which must outlive it.
async fn tls_app(pki: &Pki) -> (key_authority::server::RunningServer, TestDb) {
    let db = TestDb::sqlite().await;
    let mut config = test_config(&db);
    config.tls = Some(pki.server.clone());
    let server = key_authority::server::RunningServer::start(config)
        .await
        .unwrap();
    (server, db)
}

async fn tls_channel(
    server: &key_authority::server::RunningServer,
    pki: &Pki,
    with_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_cert {
        tls = tls.identity(Identity::from_pem(
            &pki.client_cert_pem,
            &pki.client_key_pem,
        ));
    }
    Channel::from_shared(format!("https://{}", server.local_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

async fn verify_over(channel: Channel) -> Result<pb::VerifyKeyResponse, tonic::Status> {
    VerifyServiceClient::new(channel)
        .verify_key(pb::VerifyKeyRequest {
            key: "ka_live_x".into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_ca() {
    let pki = pki(false);
    let (server, _db) = tls_app(&pki).await;
    let channel = tls_channel(&server, &pki, false)
        .await
        .expect("TLS handshake");
    let verdict = verify_over(channel).await.unwrap();
    assert_eq!(code(&verdict), pb::VerifyCode::Malformed);
    // Plaintext is not served on a TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.local_addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(
            verify_over(channel).await.is_err(),
            "plaintext must not be answered"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let pki = pki(true);
    let (server, _db) = tls_app(&pki).await;

    let refused = match tls_channel(&server, &pki, false).await {
        Err(_) => true,
        Ok(channel) => verify_over(channel).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");

    let channel = tls_channel(&server, &pki, true)
        .await
        .expect("mutual TLS handshake");
    let verdict = verify_over(channel).await.unwrap();
    assert_eq!(
        code(&verdict),
        pb::VerifyCode::Malformed,
        "a client with a certificate gets through"
    );
    server.shutdown().await.unwrap();
}
