//! The seed corpus, as code: `corpus/<target>/<name>` holds exactly these bytes (a test checks
//! it; `FUZZ_WRITE_SEEDS=1 cargo test` rewrites the files after a change here). Seeds are valid
//! inputs of each target, so that fuzzing starts from the paths that accept, plus a few near
//! misses.

use key_authority::key::format::checksum;
use key_authority::key::{Brand, Environment, GeneratedKey, KeyId, WorkspaceId};
use key_authority::keys::page_token::PageTokenCodec;
use key_authority::pb;
use prost::Message as _;

use super::{
    JWT_AUDIENCE, JWT_ISSUER, PAGE_TOKEN_LISTING, PAGE_TOKEN_MAC_KEY, PAGE_TOKEN_WORKSPACE,
    REQUESTS, sign_hs256,
};

/// One seed file: its target, its file name and its bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed {
        target,
        name: name.into(),
        bytes: bytes.into(),
    }
}

/// A well-formed key with a fixed id and secret, so that the seed files never change.
fn fixed_key(environment: &str) -> String {
    let text = format!("ka_{environment}_AbCdEfGhIjKl0123456789abcdefghijklmnopqrstuv");
    format!("{text}{}", checksum(text.as_bytes()))
}

const FIXED_KEY_ID: &str = "AbCdEfGhIjKl";

/// Claims a dashboard user's token carries, valid until 2286.
fn claims(sub: &str, workspace: &str, role: &str) -> String {
    format!(
        r#"{{"sub":"{sub}","workspace_id":"{workspace}","role":"{role}","exp":9999999999,"iss":"{JWT_ISSUER}","aud":"{JWT_AUDIENCE}"}}"#
    )
}

fn with_prefix(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    [prefix, rest].concat()
}

/// A valid request for each of `REQUESTS`, in its order.
fn requests() -> Vec<Vec<u8>> {
    let key_id = FIXED_KEY_ID.to_owned();
    let workspace_id = "w1".to_owned();
    let timestamp = prost_types::Timestamp {
        seconds: 1_900_000_000,
        nanos: 0,
    };
    let duration = prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    };
    let messages = vec![
        pb::IssueKeyRequest {
            workspace_id: workspace_id.clone(),
            name: "fuzz key".to_owned(),
            description: "a key".to_owned(),
            scopes: vec!["read".to_owned(), "keys:write".to_owned()],
            environment: pb::Environment::Test as i32,
            role: pb::Role::Developer as i32,
            expiration: Some(pb::issue_key_request::Expiration::Ttl(duration)),
            metadata: [("team".to_owned(), "fuzz".to_owned())].into(),
            usage_limit: 10,
            request_id: "0b5a3f6e-2c1d-4e8f-9a7b-6c5d4e3f2a1b".to_owned(),
        }
        .encode_to_vec(),
        pb::GetKeyRequest {
            workspace_id: workspace_id.clone(),
            key_id: key_id.clone(),
        }
        .encode_to_vec(),
        pb::ListKeysRequest {
            workspace_id: workspace_id.clone(),
            page_size: 10,
            page_token: String::new(),
            include_inactive: true,
        }
        .encode_to_vec(),
        pb::RevokeKeyRequest {
            workspace_id: workspace_id.clone(),
            key_id: key_id.clone(),
            revoke_successors: true,
            request_id: String::new(),
        }
        .encode_to_vec(),
        pb::RotateKeyRequest {
            workspace_id: workspace_id.clone(),
            key_id: key_id.clone(),
            grace_period: Some(duration),
            expiration: Some(pb::rotate_key_request::Expiration::ExpireTime(timestamp)),
            request_id: String::new(),
        }
        .encode_to_vec(),
        pb::IssueTrialKeyRequest {
            name: "trial".to_owned(),
            client_ip: "203.0.113.7".to_owned(),
            request_id: String::new(),
        }
        .encode_to_vec(),
        pb::RevokeTrialKeyRequest {
            prefix: format!("ka_trial_{FIXED_KEY_ID}"),
            client_ip: "203.0.113.7".to_owned(),
        }
        .encode_to_vec(),
        pb::UpdateKeyRequest {
            key: Some(pb::Key {
                key_id: key_id.clone(),
                workspace_id: workspace_id.clone(),
                name: "renamed".to_owned(),
                scopes: vec!["read".to_owned()],
                role: pb::Role::Viewer as i32,
                expire_time: Some(timestamp),
                enabled: true,
                etag: "1".to_owned(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".to_owned(), "scopes".to_owned(), "enabled".to_owned()],
            }),
            request_id: String::new(),
        }
        .encode_to_vec(),
        pb::ListAuditEventsRequest {
            workspace_id: workspace_id.clone(),
            page_size: 5,
            key_id: key_id.clone(),
            actor_id: "admin".to_owned(),
            start_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            end_time: Some(timestamp),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::WatchKeyEventsRequest {
            workspace_id: workspace_id.clone(),
            after_position: 0,
            from_now: false,
            all_workspaces: false,
        }
        .encode_to_vec(),
        pb::CreateWebhookRequest {
            workspace_id: workspace_id.clone(),
            url: "http://93.184.215.14:8080/hook".to_owned(),
            event_types: vec!["key.revoked".to_owned()],
            description: "hook".to_owned(),
        }
        .encode_to_vec(),
        pb::ListWebhooksRequest {
            workspace_id: workspace_id.clone(),
        }
        .encode_to_vec(),
        pb::DeleteWebhookRequest {
            workspace_id: workspace_id.clone(),
            webhook_id: "wh_0".to_owned(),
        }
        .encode_to_vec(),
        pb::ListWebhookDeliveriesRequest {
            workspace_id: workspace_id.clone(),
            webhook_id: "wh_0".to_owned(),
            page_size: 3,
            page_token: String::new(),
            state: 1,
        }
        .encode_to_vec(),
        pb::RedeliverWebhookEventRequest {
            workspace_id: workspace_id.clone(),
            webhook_id: "wh_0".to_owned(),
            event_id: "ev_0".to_owned(),
        }
        .encode_to_vec(),
        pb::VerifyKeyRequest {
            key: fixed_key("live"),
            required_scopes: vec!["read".to_owned()],
            client_ip: "198.51.100.1".to_owned(),
            cost: Some(1),
            minimum_role: pb::Role::Viewer as i32,
        }
        .encode_to_vec(),
    ];
    assert_eq!(messages.len(), REQUESTS.len());
    messages
}

pub fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();

    // presented_key
    for environment in ["live", "test", "dev", "trial"] {
        seeds.push(seed("presented_key", environment, fixed_key(environment)));
    }
    let generated = GeneratedKey::derived(
        &Brand::parse("acme2").expect("a brand"),
        Environment::Live,
        KeyId::parse(FIXED_KEY_ID).expect("a key id"),
        &[3; 32],
    );
    seeds.push(seed("presented_key", "branded", generated.plaintext));
    // Without its checksum: the target appends the right one.
    seeds.push(seed(
        "presented_key",
        "unchecked",
        "ka_live_AbCdEfGhIjKl0123456789abcdefghijklmnopqrstuv",
    ));
    seeds.push(seed("presented_key", "key_id", FIXED_KEY_ID));
    seeds.push(seed("presented_key", "wrong_check", {
        let mut key = fixed_key("live");
        key.pop();
        key.push('!');
        key
    }));

    // page_token
    let codec = PageTokenCodec::new(PAGE_TOKEN_MAC_KEY.to_vec());
    let workspace = WorkspaceId::parse(PAGE_TOKEN_WORKSPACE).expect("a workspace id");
    let key_id = KeyId::parse(FIXED_KEY_ID).expect("a key id");
    for include_inactive in [false, true] {
        let token = codec.encode(&workspace, include_inactive, 1_700_000_000_000_000, &key_id);
        let flag = [u8::from(include_inactive)];
        seeds.push(seed(
            "page_token",
            format!("keys_{include_inactive}"),
            with_prefix(&flag, token.as_bytes()),
        ));
    }
    let audit = codec.encode_audit(PAGE_TOKEN_LISTING, 41);
    seeds.push(seed(
        "page_token",
        "audit",
        with_prefix(&[0], audit.as_bytes()),
    ));
    let mut raw = vec![0];
    raw.extend_from_slice(&1_700_000_000_000_000_i64.to_be_bytes());
    raw.extend_from_slice(FIXED_KEY_ID.as_bytes());
    seeds.push(seed("page_token", "raw_position", raw));

    // jwt
    let developer = claims("user-1", "w1", "developer");
    seeds.push(seed(
        "jwt",
        "signed_claims",
        with_prefix(&[1], developer.as_bytes()),
    ));
    seeds.push(seed(
        "jwt",
        "signed_header_and_claims",
        with_prefix(
            &[1],
            format!(
                "{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}}\n{}",
                claims("u", "w.2", "account_admin")
            )
            .as_bytes(),
        ),
    ));
    seeds.push(seed(
        "jwt",
        "token_text",
        with_prefix(
            &[0],
            sign_hs256(r#"{"alg":"HS256"}"#, &developer).as_bytes(),
        ),
    ));
    seeds.push(seed(
        "jwt",
        "expired",
        with_prefix(
            &[1],
            format!(r#"{{"sub":"u","workspace_id":"w1","role":"viewer","exp":1,"iss":"{JWT_ISSUER}","aud":"{JWT_AUDIENCE}"}}"#).as_bytes(),
        ),
    ));
    seeds.push(seed(
        "jwt",
        "unknown_role",
        with_prefix(&[1], claims("u", "w1", "owner").as_bytes()),
    ));
    seeds.push(seed("jwt", "three_parts", &b"\0a.b.c"[..]));

    // requests and grpc_server
    let requests = requests();
    for (selector, (rpc, body)) in REQUESTS.iter().zip(&requests).enumerate() {
        let selector = selector as u8;
        seeds.push(seed("requests", *rpc, with_prefix(&[selector], body)));
        seeds.push(seed("requests", format!("{rpc}_empty"), [selector]));
        // As the admin, framed by the target.
        seeds.push(seed("grpc_server", *rpc, with_prefix(&[selector, 0], body)));
    }
    // As a dashboard user (a signed JWT), with both optional headers.
    let user = claims("user-1", "w1", "account_admin");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request_id = "0b5a3f6e-2c1d-4e8f-9a7b-6c5d4e3f2a1b";
    let mut as_user = vec![0, 3 | (1 << 4) | (1 << 5), user.len() as u8];
    as_user.extend_from_slice(user.as_bytes());
    as_user.push(request_id.len() as u8);
    as_user.extend_from_slice(request_id.as_bytes());
    as_user.push(traceparent.len() as u8);
    as_user.extend_from_slice(traceparent.as_bytes());
    as_user.extend_from_slice(&requests[0]);
    seeds.push(seed("grpc_server", "IssueKey_as_user", as_user));
    // An API key as the credentials (the whole header), and a raw frame as the body.
    let header = format!("Bearer {}", fixed_key("live"));
    let mut as_key = vec![2, 2 | (1 << 2), header.len() as u8];
    as_key.extend_from_slice(header.as_bytes());
    as_key.extend_from_slice(&[0, 0, 0, 0, 2, 0x10, 1]);
    seeds.push(seed("grpc_server", "ListKeys_as_api_key_raw", as_key));

    // webhook_target: flag byte, 16 address bytes, port, URL.
    let address = |flags: u8, octets: [u8; 16], port: u16, url: &str| {
        let mut bytes = vec![flags];
        bytes.extend_from_slice(&octets);
        bytes.extend_from_slice(&port.to_be_bytes());
        bytes.extend_from_slice(url.as_bytes());
        bytes
    };
    let v4 = |a: u8, b: u8, c: u8, d: u8| {
        let mut octets = [0; 16];
        octets[..4].copy_from_slice(&[a, b, c, d]);
        octets
    };
    let metadata_v6 = "fd00:ec2::254"
        .parse::<std::net::Ipv6Addr>()
        .expect("an address")
        .octets();
    for (name, bytes) in [
        (
            "public",
            address(0, v4(93, 184, 215, 14), 443, "https://example.com/hook"),
        ),
        (
            "loopback",
            address(2, v4(127, 0, 0, 1), 50051, "http://127.0.0.1:50051/"),
        ),
        (
            "metadata",
            address(
                0,
                v4(169, 254, 169, 254),
                80,
                "http://169.254.169.254/latest",
            ),
        ),
        (
            "mapped",
            address(4, v4(10, 0, 0, 1), 9090, "http://[::ffff:10.0.0.1]:9090/"),
        ),
        (
            "metadata_v6",
            address(1, metadata_v6, 80, "http://[fd00:ec2::254]/"),
        ),
        (
            "odd_ipv4",
            address(0, v4(0, 0, 0, 0), 0, "http://0x7f.1/x?y#z"),
        ),
        (
            "credentials",
            address(
                0,
                v4(8, 8, 8, 8),
                8080,
                "https://user:pw@host.example:8443/p",
            ),
        ),
    ] {
        seeds.push(seed("webhook_target", name, bytes));
    }
    seeds
}
