//! Bad input gets INVALID_ARGUMENT naming the field, never a panic.

use key_authority::pb;
use pb::issue_key_request::Expiration;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestApp, TestDb, on_both_databases, reason};

fn valid() -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        workspace_id: "acme".into(),
        name: "ok".into(),
        ..Default::default()
    }
}

async fn issue_refuses_bad_fields_by_name(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let past = prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    let many_metadata = (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let cases: Vec<(&str, pb::IssueKeyRequest)> = vec![
        (
            "workspace_id",
            pb::IssueKeyRequest {
                workspace_id: String::new(),
                ..valid()
            },
        ),
        (
            "workspace_id",
            pb::IssueKeyRequest {
                workspace_id: "has space".into(),
                ..valid()
            },
        ),
        (
            "name",
            pb::IssueKeyRequest {
                name: String::new(),
                ..valid()
            },
        ),
        (
            "name",
            pb::IssueKeyRequest {
                name: "n".repeat(129),
                ..valid()
            },
        ),
        (
            "description",
            pb::IssueKeyRequest {
                description: "d".repeat(1025),
                ..valid()
            },
        ),
        (
            "scopes",
            pb::IssueKeyRequest {
                scopes: vec!["bad scope".into()],
                ..valid()
            },
        ),
        (
            "scopes",
            pb::IssueKeyRequest {
                scopes: (0..65).map(|i| format!("s{i}")).collect(),
                ..valid()
            },
        ),
        (
            "role",
            pb::IssueKeyRequest {
                role: 99,
                ..valid()
            },
        ),
        (
            "environment",
            pb::IssueKeyRequest {
                environment: 42,
                ..valid()
            },
        ),
        (
            "expire_time",
            pb::IssueKeyRequest {
                expiration: Some(Expiration::ExpireTime(past)),
                ..valid()
            },
        ),
        (
            "ttl",
            pb::IssueKeyRequest {
                expiration: Some(Expiration::Ttl(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                })),
                ..valid()
            },
        ),
        (
            "ttl",
            pb::IssueKeyRequest {
                expiration: Some(Expiration::Ttl(prost_types::Duration::default())),
                ..valid()
            },
        ),
        (
            "metadata",
            pb::IssueKeyRequest {
                metadata: many_metadata,
                ..valid()
            },
        ),
        (
            "metadata",
            pb::IssueKeyRequest {
                metadata: [("k".to_owned(), "v".repeat(513))].into(),
                ..valid()
            },
        ),
    ];
    for (field, request) in cases {
        let status = app.keys.issue_key(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
        assert_eq!(reason(&status), "INVALID_ARGUMENT");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("field").map(String::as_str), Some(field));
        let bad_request = status.get_details_bad_request().unwrap();
        assert_eq!(bad_request.field_violations[0].field, field);
    }
    // Nothing was written by any of them.
    let listed = app
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 0);
    app.stop().await;
}

async fn oversized_messages_are_refused(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let status = app
        .verify
        .verify_key(pb::VerifyKeyRequest {
            key: "k".repeat(32 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::OutOfRange,
        "tonic refuses oversized messages as OUT_OF_RANGE"
    );
    let status = app
        .keys
        .issue_key(pb::IssueKeyRequest {
            description: "d".repeat(128 * 1024),
            ..valid()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::OutOfRange,
        "tonic refuses oversized messages as OUT_OF_RANGE"
    );
    app.stop().await;
}

async fn missing_ids_are_invalid(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let status = app.get("acme", "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("key_id"));
    let status = app.revoke("", "AAAAAAAAAAAA").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("workspace_id"));
    app.stop().await;
}

fn expiring(expiration: Expiration) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        expiration: Some(expiration),
        ..valid()
    }
}

fn years(years: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: years * 31_557_600,
        nanos: 0,
    }
}

/// The field a refusal names in its BadRequest detail.
fn violated_field(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .and_then(|bad| bad.field_violations.into_iter().next())
        .map(|violation| violation.field)
        .unwrap_or_default()
}

/// Expiries beyond --max-key-lifetime (10 years by default) are refused by the field's name;
/// one inside it is stored as asked.
async fn expiries_stay_within_the_maximum_lifetime(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let status = app
        .keys
        .issue_key(expiring(Expiration::Ttl(years(11))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "ttl");
    assert!(status.message().contains("10years"), "{status:?}");
    let year_3000 = prost_types::Timestamp {
        seconds: 32_503_680_000,
        nanos: 0,
    };
    let status = app
        .keys
        .issue_key(expiring(Expiration::ExpireTime(year_3000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "expire_time");

    let issued = app.issue_with(expiring(Expiration::Ttl(years(9)))).await;
    let key = issued.key.unwrap();
    let lifetime = key.expire_time.unwrap().seconds - key.create_time.unwrap().seconds;
    assert_eq!(lifetime, years(9).seconds);
    app.stop().await;
}

/// With --max-key-lifetime 0, any expiry a protobuf Timestamp can carry is accepted, and
/// nothing past the end of year 9999 (which JSON clients could not render) is stored.
async fn expiries_stay_within_the_timestamp_range(db: TestDb) {
    let mut config = crate::common::test_config(&db);
    config.limits.max_key_lifetime = None;
    let mut app = TestApp::spawn_with(config).await;
    let last_second = 253_402_300_799;
    let at_the_end = app
        .issue_with(expiring(Expiration::ExpireTime(prost_types::Timestamp {
            seconds: last_second,
            nanos: 0,
        })))
        .await;
    assert_eq!(
        at_the_end.key.unwrap().expire_time.unwrap().seconds,
        last_second
    );
    let status = app
        .keys
        .issue_key(expiring(Expiration::ExpireTime(prost_types::Timestamp {
            seconds: last_second + 1,
            nanos: 0,
        })))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "expire_time");
    let status = app
        .keys
        .issue_key(expiring(Expiration::Ttl(years(9000))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_field(&status), "ttl");
    // The workspace still lists: every stored expiry is a valid Timestamp.
    let listed = app
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: valid().workspace_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 1);
    app.stop().await;
}

on_both_databases!(
    expiries_stay_within_the_maximum_lifetime,
    expiries_stay_within_the_timestamp_range,
    issue_refuses_bad_fields_by_name,
    oversized_messages_are_refused,
    missing_ids_are_invalid,
);
