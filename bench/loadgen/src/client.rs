//! gRPC plumbing shared by every scenario: connections, the few management calls, the probes
//! that request loops send, and wrong-secret keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use key_authority::key::format::{BASE62, CHECK_LEN, KEY_ID_LEN, SECRET_LEN, checksum};
use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::driver::Probe;
use crate::stats::Failure;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

/// The workspace every benchmark key is issued in.
pub const WORKSPACE: &str = "loadgen";

/// Connection settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct Net {
    /// Deadline of each RPC, so that no request loop can hang.
    pub request_timeout: Duration,
    /// How many request loops share one HTTP/2 connection.
    pub loops_per_connection: usize,
    /// `authorization` value for KeyService calls (issue, revoke), when the server wants one.
    pub admin_auth: Option<MetadataValue<Ascii>>,
    /// `authorization` value for VerifyKey calls, when the server wants one.
    pub verify_auth: Option<MetadataValue<Ascii>>,
}

/// The `authorization: Bearer <token>` value of `token`.
pub fn bearer(token: &str) -> Result<MetadataValue<Ascii>> {
    Ok(format!("Bearer {token}").parse()?)
}

/// `message` as a request carrying `auth` as its `authorization` header, if any.
pub fn authorized<T>(message: T, auth: Option<&MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", auth.clone());
    }
    request
}

impl Net {
    /// One HTTP/2 connection to `addr` (`host:port`, plain text).
    pub async fn connect(&self, addr: &str) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.request_timeout)
            .tcp_nodelay(true);
        Ok(endpoint.connect().await?)
    }

    /// Enough connections for `loops` request loops, `loops_per_connection` loops each.
    pub async fn connect_for_loops(&self, addr: &str, loops: usize) -> Result<Vec<Channel>> {
        let count = loops.div_ceil(self.loops_per_connection.max(1)).max(1);
        let mut channels = Vec::with_capacity(count);
        for _ in 0..count {
            channels.push(self.connect(addr).await?);
        }
        Ok(channels)
    }
}

/// Waits until `addr` answers grpc.health Check with SERVING, for at most `wait`.
pub async fn wait_serving(net: &Net, addr: &str, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        let last_error = match net.connect(addr).await {
            Ok(channel) => match HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => {
                    return Ok(());
                }
                Ok(response) => format!("health status {}", response.get_ref().status),
                Err(status) => status.to_string(),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("{addr} is not serving after {wait:?}: {last_error}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A key issued for the benchmark: its id and whole plaintext.
#[derive(Clone)]
pub struct IssuedKey {
    pub key_id: String,
    pub secret: String,
}

pub async fn issue_key(
    net: &Net,
    client: &mut KeyServiceClient<Channel>,
    name: &str,
) -> Result<IssuedKey> {
    let request = pb::IssueKeyRequest {
        workspace_id: WORKSPACE.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    };
    let response = client
        .issue_key(authorized(request, net.admin_auth.as_ref()))
        .await?
        .into_inner();
    let key = response.key.ok_or("IssueKey answered without a key")?;
    if response.secret.is_empty() {
        return Err("IssueKey answered without a secret".into());
    }
    Ok(IssuedKey {
        key_id: key.key_id,
        secret: response.secret,
    })
}

/// Issues a key on `channel` and verifies it once, so that its state and verdict are cached:
/// every later VerifyKey of it is warm.
pub async fn issue_warm_key(net: &Net, channel: Channel, name: &str) -> Result<IssuedKey> {
    let key = issue_key(net, &mut KeyServiceClient::new(channel.clone()), name).await?;
    let code = verify_code(
        &mut VerifyServiceClient::new(channel),
        &key.secret,
        net.verify_auth.as_ref(),
    )
    .await
    .map_err(|failure| format!("warm-up VerifyKey failed: {failure:?}"))?;
    expect_code(code, pb::VerifyCode::Valid)
        .map_err(|failure| format!("warm-up VerifyKey: {failure:?}"))?;
    Ok(key)
}

pub async fn revoke_key(
    net: &Net,
    client: &mut KeyServiceClient<Channel>,
    key_id: &str,
) -> Result<()> {
    let request = pb::RevokeKeyRequest {
        workspace_id: WORKSPACE.to_owned(),
        key_id: key_id.to_owned(),
        ..Default::default()
    };
    client
        .revoke_key(authorized(request, net.admin_auth.as_ref()))
        .await?;
    Ok(())
}

/// One VerifyKey call; the answer's code, or the RPC's failure.
pub async fn verify_code(
    client: &mut VerifyServiceClient<Channel>,
    key: &str,
    auth: Option<&MetadataValue<Ascii>>,
) -> std::result::Result<pb::VerifyCode, Failure> {
    let request = pb::VerifyKeyRequest {
        key: key.to_owned(),
        ..Default::default()
    };
    let response = client
        .verify_key(authorized(request, auth))
        .await
        .map_err(|status| Failure::rpc(&status))?
        .into_inner();
    let code = pb::VerifyCode::try_from(response.code)
        .map_err(|_| Failure::new("unknown code", response.code.to_string()))?;
    if response.valid != (code == pb::VerifyCode::Valid) {
        return Err(Failure::new(
            "valid flag disagrees with code",
            format!("valid={} code={code:?}", response.valid),
        ));
    }
    Ok(code)
}

/// [`verify_code`], retried while the server answers VERIFY_BUSY (its argon2 budget for unproven
/// secrets is spent), as a client honouring the RetryInfo would: for warm-ups, which must prove
/// every key once however tight the budget.
pub async fn verify_code_patiently(
    client: &mut VerifyServiceClient<Channel>,
    key: &str,
    auth: Option<&MetadataValue<Ascii>>,
) -> std::result::Result<pb::VerifyCode, Failure> {
    loop {
        match verify_code(client, key, auth).await {
            Err(failure) if failure.is_verify_busy() => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            answer => return answer,
        }
    }
}

/// `VALID`, `NOT_FOUND`, ...: the code's proto name without its enum prefix.
pub fn code_name(code: pb::VerifyCode) -> &'static str {
    code.as_str_name().trim_start_matches("VERIFY_CODE_")
}

/// Checks that `code` is `expected`.
pub fn expect_code(
    code: pb::VerifyCode,
    expected: pb::VerifyCode,
) -> std::result::Result<(), Failure> {
    if code == expected {
        Ok(())
    } else {
        Err(Failure::new(
            format!("code {code:?}"),
            format!("expected {expected:?}"),
        ))
    }
}

/// grpc.health Check with an empty service name; must answer SERVING.
pub struct CheckProbe {
    client: HealthClient<Channel>,
}

impl CheckProbe {
    pub fn new(channel: Channel) -> Self {
        Self {
            client: HealthClient::new(channel),
        }
    }
}

impl Probe for CheckProbe {
    async fn call(&mut self) -> std::result::Result<&'static str, Failure> {
        let response = self
            .client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| Failure::rpc(&status))?;
        let status = response.get_ref().status;
        if status == ServingStatus::Serving as i32 {
            Ok("SERVING")
        } else {
            Err(Failure::new("not serving", status.to_string()))
        }
    }
}

/// VerifyKey of one known key; must answer `expected` (VALID for the warm key).
pub struct VerifyProbe {
    client: VerifyServiceClient<Channel>,
    key: Arc<str>,
    expected: pb::VerifyCode,
    auth: Option<MetadataValue<Ascii>>,
}

impl VerifyProbe {
    pub fn new(net: &Net, channel: Channel, key: Arc<str>, expected: pb::VerifyCode) -> Self {
        Self {
            client: VerifyServiceClient::new(channel),
            key,
            expected,
            auth: net.verify_auth.clone(),
        }
    }
}

impl Probe for VerifyProbe {
    async fn call(&mut self) -> std::result::Result<&'static str, Failure> {
        let code = verify_code(&mut self.client, &self.key, self.auth.as_ref()).await?;
        expect_code(code, self.expected)?;
        Ok(code_name(code))
    }
}

/// VerifyKey of known keys with a different wrong secret every request (a valid checksum, so
/// the server has to look the key up and run argon2, unless it has locked the key out); must
/// answer NOT_FOUND or LOCKED. The victims are taken in turn by all loops together, so each
/// key sees the same share of the flood.
pub struct WrongSecretProbe {
    client: VerifyServiceClient<Channel>,
    keys: Arc<Vec<IssuedKey>>,
    next_victim: Arc<AtomicUsize>,
    /// Unique per loop, so no two requests of a run ever carry the same wrong key.
    sequence: u64,
    rng: SplitMix64,
    auth: Option<MetadataValue<Ascii>>,
}

impl WrongSecretProbe {
    pub fn new(
        net: &Net,
        channel: Channel,
        keys: Arc<Vec<IssuedKey>>,
        next_victim: Arc<AtomicUsize>,
        loop_index: u64,
    ) -> Self {
        Self {
            client: VerifyServiceClient::new(channel),
            keys,
            next_victim,
            sequence: loop_index << 40,
            rng: SplitMix64::seeded(),
            auth: net.verify_auth.clone(),
        }
    }
}

impl Probe for WrongSecretProbe {
    async fn call(&mut self) -> std::result::Result<&'static str, Failure> {
        self.sequence += 1;
        let turn = self.next_victim.fetch_add(1, Ordering::Relaxed);
        let victim = &self.keys[turn % self.keys.len()];
        let wrong = wrong_secret_key(&victim.secret, self.sequence, &mut self.rng)
            .map_err(|error| Failure::new("bad victim key", error.to_string()))?;
        let code = match verify_code(&mut self.client, &wrong, self.auth.as_ref()).await {
            Ok(code) => code,
            // The server's argon2 budget for unproven secrets is spent: refused at once, which
            // is the intended answer to a flood (RESOURCE_EXHAUSTED, VERIFY_BUSY).
            Err(failure) if failure.is_verify_busy() => return Ok("BUSY"),
            Err(failure) => return Err(failure),
        };
        match code {
            pb::VerifyCode::NotFound | pb::VerifyCode::Locked => Ok(code_name(code)),
            other => Err(Failure::new(
                format!("code {other:?}"),
                "expected NotFound or Locked for a wrong secret",
            )),
        }
    }
}

/// VerifyKey of a well-formed key whose key id exists nowhere (a fresh random id every
/// request, a valid checksum): the server reads the database and answers NOT_FOUND, caching the
/// absence. Must answer NOT_FOUND or LOCKED.
pub struct UnknownIdProbe {
    client: VerifyServiceClient<Channel>,
    /// `<brand>_<env>_` of a real key.
    head: String,
    rng: SplitMix64,
    auth: Option<MetadataValue<Ascii>>,
}

impl UnknownIdProbe {
    pub fn new(net: &Net, channel: Channel, any_key: &str) -> Result<Self> {
        let second_underscore = any_key
            .match_indices('_')
            .nth(1)
            .map(|(index, _)| index)
            .ok_or("a key has the shape <brand>_<env>_<body>")?;
        Ok(Self {
            client: VerifyServiceClient::new(channel),
            head: any_key[..=second_underscore].to_owned(),
            rng: SplitMix64::seeded(),
            auth: net.verify_auth.clone(),
        })
    }
}

impl Probe for UnknownIdProbe {
    async fn call(&mut self) -> std::result::Result<&'static str, Failure> {
        let mut text = self.head.clone();
        for _ in 0..KEY_ID_LEN + SECRET_LEN {
            text.push(BASE62[(self.rng.next() % 62) as usize] as char);
        }
        let check = checksum(text.as_bytes());
        text.push_str(&check);
        let code = verify_code(&mut self.client, &text, self.auth.as_ref()).await?;
        match code {
            pb::VerifyCode::NotFound | pb::VerifyCode::Locked => Ok(code_name(code)),
            other => Err(Failure::new(
                format!("code {other:?}"),
                "expected NotFound or Locked for an unknown key id",
            )),
        }
    }
}

/// Characters of the wrong secret spent on the sequence number: 62^11 > 2^64.
const SEQUENCE_DIGITS: usize = 11;

/// `key` (a whole valid key) with its 32-character secret replaced: the first 11 characters
/// carry `sequence` in base62 (so distinct sequences give distinct keys), the rest are random,
/// and the 6-character CRC32 checksum is recomputed so the server cannot refuse it as malformed.
pub fn wrong_secret_key(key: &str, sequence: u64, rng: &mut SplitMix64) -> Result<String> {
    let second_underscore = key
        .match_indices('_')
        .nth(1)
        .map(|(index, _)| index)
        .ok_or("a key has the shape <brand>_<env>_<body>")?;
    let prefix_len = second_underscore + 1 + KEY_ID_LEN;
    if key.len() != prefix_len + SECRET_LEN + CHECK_LEN {
        return Err(format!("unexpected key length {}", key.len()).into());
    }
    let original_secret = &key[prefix_len..prefix_len + SECRET_LEN];
    loop {
        let mut text = String::with_capacity(key.len());
        text.push_str(&key[..prefix_len]);
        let mut digits = [b'0'; SEQUENCE_DIGITS];
        let mut rest = sequence;
        for slot in digits.iter_mut().rev() {
            *slot = BASE62[(rest % 62) as usize];
            rest /= 62;
        }
        text.extend(digits.iter().map(|&b| b as char));
        for _ in SEQUENCE_DIGITS..SECRET_LEN {
            text.push(BASE62[(rng.next() % 62) as usize] as char);
        }
        if &text[prefix_len..] == original_secret {
            continue;
        }
        let check = checksum(text.as_bytes());
        text.push_str(&check);
        return Ok(text);
    }
}

/// A tiny non-cryptographic generator: wrong secrets only need to differ, not to be secret.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn seeded() -> Self {
        Self(getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use key_authority::key::{Brand, Environment, GeneratedKey, PresentedKey};

    use super::*;

    #[test]
    fn wrong_secret_keys_parse_and_differ() {
        let key = GeneratedKey::generate(&Brand::default(), Environment::Live);
        let mut rng = SplitMix64::seeded();
        let mut seen = std::collections::HashSet::new();
        for sequence in 0..1000 {
            let wrong = wrong_secret_key(&key.plaintext, sequence, &mut rng).unwrap();
            let parsed =
                PresentedKey::parse(&wrong).expect("a wrong secret keeps a valid checksum");
            assert_eq!(parsed.key_id(), key.key_id.as_str());
            assert_ne!(wrong, key.plaintext);
            assert!(wrong.starts_with(&key.prefix));
            assert!(seen.insert(wrong));
        }
    }

    #[test]
    fn checksum_matches_generated_keys() {
        let key = GeneratedKey::generate(&Brand::default(), Environment::Test);
        let (body, check) = key.plaintext.split_at(key.plaintext.len() - CHECK_LEN);
        assert_eq!(checksum(body.as_bytes()), check);
    }
}
