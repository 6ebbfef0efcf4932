//! [`VerifyKeyLayer`]: a tower layer that lets a request through only with a valid API key.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use moka::future::Cache;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt as _};
use tower::{Layer, Service};

use crate::pb::{self, Environment, Role, VerifyCode};
use crate::{Error, KeyAuthorityClient};

/// The `ErrorInfo.domain` of the refusals the layer sends.
pub const ERROR_DOMAIN: &str = "key-authority-client";

/// The longest time a VALID verdict may be cached, whatever the layer is asked for.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(5);

/// Keys are at most 256 bytes (README.md, "The key format"); anything longer is refused here
/// without a call.
const MAX_KEY_LEN: usize = 256;

/// The API key a request was accepted with: inserted into the request's extensions by
/// [`VerifyKeyLayer`] before the inner service runs.
///
/// With tonic, read it with `request.extensions().get::<VerifiedKey>()`; with axum, take an
/// `Extension<VerifiedKey>`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedKey {
    /// The key's id (12 base62 characters).
    pub key_id: String,
    /// The workspace the key belongs to: scope every read and write of the request to it.
    pub workspace_id: String,
    /// The key's public prefix `<brand>_<env>_<key_id>`: safe to log.
    pub prefix: String,
    /// The key's human-readable name.
    pub name: String,
    /// The scopes the key grants (empty means full access).
    pub scopes: Vec<String>,
    /// The key's role.
    pub role: Role,
    /// The key's environment (live, test, dev or trial).
    pub environment: Environment,
}

impl VerifiedKey {
    /// The verified view of a key's public metadata (e.g. to build one in a handler's tests).
    pub fn from_key(key: &pb::Key) -> Self {
        Self {
            key_id: key.key_id.clone(),
            workspace_id: key.workspace_id.clone(),
            prefix: key.prefix.clone(),
            name: key.name.clone(),
            scopes: key.scopes.clone(),
            role: key.role(),
            environment: key.environment(),
        }
    }
}

type ClientIpFn = dyn Fn(&HeaderMap, &http::Extensions) -> Option<IpAddr> + Send + Sync;

/// A tower [`Layer`] for tonic and axum servers (any `Service<http::Request<B>>` answering
/// `http::Response<R>` with `R: Default`) that verifies the caller's API key with key-authority
/// before the inner service runs.
///
/// The key is read from `authorization: Bearer <key>` and checked with `VerifyKey` (with the
/// [`required scopes`](Self::require_scopes), if any). Then:
///
/// | outcome | gRPC status (trailers-only) | HTTP status (not gRPC) | `ErrorInfo.reason` |
/// |---|---|---|---|
/// | `VALID` | the inner service's answer, with a [`VerifiedKey`] in the extensions | same | |
/// | no `authorization` header | `UNAUTHENTICATED` | 401 | `MISSING_API_KEY` |
/// | a header that is not `Bearer <key>`, or two of them | `UNAUTHENTICATED` | 401 | `MALFORMED_AUTH_HEADER` |
/// | `NOT_FOUND`, `MALFORMED`, `REVOKED`, `EXPIRED`, `DISABLED` | `UNAUTHENTICATED` | 401 | `API_KEY_<verdict>` |
/// | `INSUFFICIENT_SCOPE` | `PERMISSION_DENIED` | 403 | `API_KEY_INSUFFICIENT_SCOPE` |
/// | `LOCKED`, `USAGE_EXHAUSTED` | `RESOURCE_EXHAUSTED` | 429 | `API_KEY_LOCKED`, `API_KEY_USAGE_EXHAUSTED` |
/// | key-authority unreachable, `UNAVAILABLE` or too slow | `UNAVAILABLE` | 503 | `KEY_AUTHORITY_UNAVAILABLE` |
/// | key-authority refused the layer's own call (e.g. a wrong verify token) | `INTERNAL` | 500 | `KEY_AUTHORITY_ERROR` |
///
/// A request counts as gRPC when its `content-type` starts with `application/grpc`; refusals
/// then carry `grpc-status`, `grpc-message` and `grpc-status-details-bin` (the `ErrorInfo`
/// above, domain [`ERROR_DOMAIN`], plus a `RetryInfo` for `LOCKED`) in the response headers, with
/// an empty body. Other requests get the HTTP status with an empty body (`www-authenticate:
/// Bearer` on 401, `retry-after` when known). An outage is never reported as an invalid key. The
/// key itself is never logged, and the layer leaves the `authorization` header in place.
///
/// # The verdict cache
///
/// Off by default: every request makes one `VerifyKey` call, which key-authority answers from
/// memory in microseconds, so revocation takes effect on the very next request.
/// [`cache_valid_verdicts`](Self::cache_valid_verdicts) keeps VALID verdicts in a bounded local
/// cache (moka) keyed by a BLAKE3 digest of the key (never the plaintext), for at most
/// [`MAX_CACHE_TTL`] (5 s). **Trade-off:** a key revoked (or expired) meanwhile is still accepted
/// by this process until its entry expires, i.e. for up to the TTL, and cached requests do not
/// show in the key's `total_requests`. Refusals are never cached, and neither are usage-limited
/// keys (every use must reach key-authority to be counted).
///
/// # Client IP
///
/// By default the layer sends no `client_ip`, so key-authority's per-IP lockouts do not apply.
/// [`client_ip`](Self::client_ip) tells the layer where to find the end user's address; do not
/// use a proxy's address, or one attacker's failures lock out everyone behind that proxy.
#[derive(Clone)]
pub struct VerifyKeyLayer {
    client: KeyAuthorityClient,
    required_scopes: Arc<[String]>,
    timeout: Duration,
    cache: Option<Cache<[u8; 32], Arc<VerifiedKey>>>,
    client_ip: Option<Arc<ClientIpFn>>,
    /// Verifies warm keys in this process (and asks `client` for the rest) when set.
    #[cfg(feature = "local-verifier")]
    local: Option<crate::LocalVerifier>,
}

impl VerifyKeyLayer {
    /// A layer that verifies keys with `client`, requiring no particular scope, with no cache
    /// and a 2 s limit on each `VerifyKey` call.
    pub fn new(client: KeyAuthorityClient) -> Self {
        Self {
            client,
            required_scopes: Arc::from([]),
            timeout: Duration::from_secs(2),
            cache: None,
            client_ip: None,
            #[cfg(feature = "local-verifier")]
            local: None,
        }
    }

    /// Verifies with `verifier` (feature `local-verifier`): warm keys answered in this process,
    /// revocations pushed within milliseconds, usage reported in batches; everything else asks
    /// key-authority as before. Replaces [`cache_valid_verdicts`](Self::cache_valid_verdicts),
    /// which it makes pointless (and which would delay revocations by its TTL):
    ///
    /// ```ignore
    /// let layer = VerifyKeyLayer::new(client).local_verifier(verifier);
    /// ```
    #[cfg(feature = "local-verifier")]
    pub fn local_verifier(mut self, verifier: crate::LocalVerifier) -> Self {
        self.cache = None;
        self.local = Some(verifier);
        self
    }

    /// Scopes every key must carry (sent as `VerifyKey.required_scopes`); a key without one of
    /// them is refused with `PERMISSION_DENIED`.
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.required_scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// How long to wait for `VerifyKey` before answering `UNAVAILABLE` (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Caches VALID verdicts for `ttl` (capped at [`MAX_CACHE_TTL`], 5 s), at most `max_entries`
    /// keys. A revoked key may then be accepted for up to the TTL: see the
    /// [type's documentation](Self#the-verdict-cache). A zero TTL or capacity leaves the cache off.
    pub fn cache_valid_verdicts(mut self, ttl: Duration, max_entries: u64) -> Self {
        let ttl = ttl.min(MAX_CACHE_TTL);
        self.cache = (!ttl.is_zero() && max_entries > 0).then(|| {
            Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build()
        });
        self
    }

    /// Where to find the end user's IP address, sent as `VerifyKey.client_ip` so that
    /// key-authority can lock out an address that presents many bad keys. For a tonic server
    /// reached directly, that is the peer address:
    ///
    /// ```ignore
    /// layer.client_ip(|_, extensions| {
    ///     extensions
    ///         .get::<tonic::transport::server::TcpConnectInfo>()
    ///         .and_then(|info| info.remote_addr())
    ///         .map(|address| address.ip())
    /// })
    /// ```
    ///
    /// Behind a proxy, read the header that proxy sets (and that clients cannot forge).
    pub fn client_ip<F>(mut self, find: F) -> Self
    where
        F: Fn(&HeaderMap, &http::Extensions) -> Option<IpAddr> + Send + Sync + 'static,
    {
        self.client_ip = Some(Arc::new(find));
        self
    }

    /// How many VALID verdicts the cache holds now (0 when it is off). Approximate: moka
    /// counts lazily.
    pub fn cached_entries(&self) -> u64 {
        self.cache.as_ref().map_or(0, Cache::entry_count)
    }

    /// The cache key of a presented key: a BLAKE3 digest of the key and this layer's required
    /// scopes, so that clones of one layer given other scopes never share verdicts.
    fn cache_key(&self, key: &str) -> [u8; 32] {
        let mut digest = blake3::Hasher::new();
        digest.update(key.as_bytes());
        for scope in self.required_scopes.iter() {
            // Keys and scopes are printable ASCII, so a NUL separates them unambiguously.
            digest.update(&[0]);
            digest.update(scope.as_bytes());
        }
        *digest.finalize().as_bytes()
    }

    /// Verifies a presented key: the layer's decision for one request, without a request.
    async fn check(&self, key: &str, client_ip: Option<IpAddr>) -> Result<VerifiedKey, Refusal> {
        #[cfg(feature = "local-verifier")]
        if let Some(local) = &self.local {
            return self.check_with(local, key, client_ip).await;
        }
        let digest = self.cache.as_ref().map(|_| self.cache_key(key));
        if let (Some(cache), Some(digest)) = (&self.cache, &digest)
            && let Some(verified) = cache.get(digest).await
        {
            return Ok(VerifiedKey::clone(&verified));
        }
        let request = pb::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: self.required_scopes.to_vec(),
            client_ip: client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            cost: None,
            minimum_role: 0,
        };
        let answer = match tokio::time::timeout(self.timeout, self.client.verify_key(request)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => return Err(Refusal::from_error(&error)),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "key-authority did not answer VerifyKey in time"
                );
                return Err(Refusal::Unavailable);
            }
        };
        let code = answer.code();
        match (code, answer.valid, &answer.key) {
            (VerifyCode::Valid, true, Some(key)) => {
                let verified = VerifiedKey::from_key(key);
                if let (Some(cache), Some(digest)) = (&self.cache, digest)
                    && key.usage_limit == 0
                {
                    cache.insert(digest, Arc::new(verified.clone())).await;
                }
                Ok(verified)
            }
            (VerifyCode::Valid, _, _) => {
                tracing::warn!("key-authority answered VALID without a key: refusing");
                Err(Refusal::Internal)
            }
            _ => Err(Refusal::Verdict {
                code,
                retry_after: answer
                    .retry_after
                    .and_then(|delay| Duration::try_from(delay).ok()),
            }),
        }
    }
}

#[cfg(feature = "local-verifier")]
impl VerifyKeyLayer {
    /// The layer's decision through a [`LocalVerifier`](crate::LocalVerifier).
    async fn check_with(
        &self,
        local: &crate::LocalVerifier,
        key: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<VerifiedKey, Refusal> {
        let answer = match local.verify_local(key, &self.required_scopes) {
            Some(answer) => answer,
            None => {
                let remote = local.verify(key, &self.required_scopes, client_ip);
                match tokio::time::timeout(self.timeout, remote).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(error)) => return Err(Refusal::from_error(&error)),
                    Err(_) => return Err(Refusal::Unavailable),
                }
            }
        };
        match (answer.code, &answer.key) {
            (VerifyCode::Valid, Some(key)) => Ok(VerifiedKey::from_key(key)),
            (VerifyCode::Valid, None) => {
                tracing::warn!("key-authority answered VALID without a key: refusing");
                Err(Refusal::Internal)
            }
            (code, _) => Err(Refusal::Verdict {
                code,
                retry_after: answer.retry_after,
            }),
        }
    }
}

impl<S> Layer<S> for VerifyKeyLayer {
    type Service = VerifyKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyKeyService {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

impl fmt::Debug for VerifyKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKeyLayer")
            .field("required_scopes", &self.required_scopes)
            .field("timeout", &self.timeout)
            .field(
                "cache",
                &self
                    .cache
                    .as_ref()
                    .map(|cache| cache.policy().time_to_live()),
            )
            .field("client_ip", &self.client_ip.is_some())
            .finish_non_exhaustive()
    }
}

/// The service [`VerifyKeyLayer`] wraps around an inner service.
///
/// It keeps the inner service's [`NamedService`](tonic::server::NamedService) name, so with tonic
/// one service can be protected while others (health, reflection) stay open:
/// `Server::builder().add_service(layer.layer(EchoServiceServer::new(echo)))`.
#[derive(Clone)]
pub struct VerifyKeyService<S> {
    inner: S,
    layer: Arc<VerifyKeyLayer>,
}

impl<S: fmt::Debug> fmt::Debug for VerifyKeyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKeyService")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for VerifyKeyService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for VerifyKeyService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The instance that was polled ready serves this request; a fresh clone waits for the next.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let layer = self.layer.clone();
        Box::pin(async move {
            let grpc = is_grpc(request.headers());
            let key = match presented_key(request.headers()) {
                Ok(key) => key,
                Err(refusal) => return Ok(refusal.into_response(grpc, &layer.required_scopes)),
            };
            let client_ip = layer
                .client_ip
                .as_ref()
                .and_then(|find| find(request.headers(), request.extensions()));
            match layer.check(&key, client_ip).await {
                Ok(verified) => {
                    request.extensions_mut().insert(verified);
                    inner.call(request).await
                }
                Err(refusal) => Ok(refusal.into_response(grpc, &layer.required_scopes)),
            }
        })
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// The key of the one `authorization: Bearer <key>` header.
fn presented_key(headers: &HeaderMap) -> Result<String, Refusal> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Refusal::MissingKey)?;
    if values.next().is_some() {
        return Err(Refusal::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| Refusal::MalformedHeader)?;
    let (scheme, key) = value.split_once(' ').ok_or(Refusal::MalformedHeader)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() || key.contains(' ') {
        return Err(Refusal::MalformedHeader);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Refusal::Verdict {
            code: VerifyCode::Malformed,
            retry_after: None,
        });
    }
    Ok(key.to_owned())
}

/// Why the layer answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MissingKey,
    MalformedHeader,
    Verdict {
        code: VerifyCode,
        retry_after: Option<Duration>,
    },
    /// key-authority could not decide: unreachable, overloaded, too slow.
    Unavailable,
    /// key-authority refused the layer's own call, or answered nonsense.
    Internal,
}

impl Refusal {
    fn from_error(error: &Error) -> Self {
        match error.code() {
            // Could not decide, or could not be reached: try again later, never "invalid".
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unknown => {
                tracing::warn!(code = ?error.code(), message = error.message(), "key-authority could not verify an API key");
                Self::Unavailable
            }
            _ => {
                tracing::error!(code = ?error.code(), message = error.message(), reason = error.reason(), "key-authority refused VerifyKey");
                Self::Internal
            }
        }
    }

    /// The gRPC code, the HTTP status, the `ErrorInfo.reason` and the message.
    fn describe(self) -> (Code, StatusCode, &'static str, &'static str) {
        use Code::{Internal, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable};
        let unauthorized = StatusCode::UNAUTHORIZED;
        match self {
            Self::MissingKey => (
                Unauthenticated,
                unauthorized,
                "MISSING_API_KEY",
                "missing API key: send `authorization: Bearer <key>`",
            ),
            Self::MalformedHeader => (
                Unauthenticated,
                unauthorized,
                "MALFORMED_AUTH_HEADER",
                "the authorization header is not `Bearer <key>`",
            ),
            Self::Verdict { code, .. } => match code {
                VerifyCode::Malformed => (
                    Unauthenticated,
                    unauthorized,
                    "API_KEY_MALFORMED",
                    "the API key is malformed",
                ),
                VerifyCode::Revoked => (
                    Unauthenticated,
                    unauthorized,
                    "API_KEY_REVOKED",
                    "the API key was revoked",
                ),
                VerifyCode::Expired => (
                    Unauthenticated,
                    unauthorized,
                    "API_KEY_EXPIRED",
                    "the API key has expired",
                ),
                VerifyCode::Disabled => (
                    Unauthenticated,
                    unauthorized,
                    "API_KEY_DISABLED",
                    "the API key is disabled",
                ),
                VerifyCode::InsufficientScope => (
                    PermissionDenied,
                    StatusCode::FORBIDDEN,
                    "API_KEY_INSUFFICIENT_SCOPE",
                    "the API key lacks a required scope",
                ),
                VerifyCode::InsufficientRole => (
                    PermissionDenied,
                    StatusCode::FORBIDDEN,
                    "API_KEY_INSUFFICIENT_ROLE",
                    "the API key's role is below the required role",
                ),
                VerifyCode::Locked => (
                    ResourceExhausted,
                    StatusCode::TOO_MANY_REQUESTS,
                    "API_KEY_LOCKED",
                    "too many failed attempts: the API key is locked for a while",
                ),
                VerifyCode::UsageExhausted => (
                    ResourceExhausted,
                    StatusCode::TOO_MANY_REQUESTS,
                    "API_KEY_USAGE_EXHAUSTED",
                    "the API key's usage limit is used up",
                ),
                // NOT_FOUND, and any code this client does not know yet: a refusal.
                VerifyCode::NotFound | VerifyCode::Unspecified | VerifyCode::Valid => (
                    Unauthenticated,
                    unauthorized,
                    "API_KEY_NOT_FOUND",
                    "the API key is not valid",
                ),
            },
            Self::Unavailable => (
                Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "KEY_AUTHORITY_UNAVAILABLE",
                "the API key cannot be verified right now: retry later",
            ),
            Self::Internal => (
                Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                "KEY_AUTHORITY_ERROR",
                "the API key cannot be verified",
            ),
        }
    }

    fn retry_after(self) -> Option<Duration> {
        match self {
            Self::Verdict { retry_after, .. } => retry_after,
            _ => None,
        }
    }

    fn into_response<B: Default>(
        self,
        grpc: bool,
        required_scopes: &[String],
    ) -> http::Response<B> {
        let (code, http_status, reason, message) = self.describe();
        let retry_after = self.retry_after();
        if grpc {
            let mut metadata = HashMap::new();
            if http_status == StatusCode::FORBIDDEN {
                metadata.insert("required_scopes".to_owned(), required_scopes.join(" "));
            }
            let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
            if retry_after.is_some() {
                details.set_retry_info(retry_after);
            }
            return tonic::Status::with_error_details(code, message, details).into_http();
        }
        let mut response = http::Response::new(B::default());
        *response.status_mut() = http_status;
        if http_status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(delay) = retry_after {
            // Whole seconds, rounded up, as `retry-after` wants.
            let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn reads_one_bearer_key() {
        assert_eq!(
            presented_key(&headers(&["Bearer ka_live_abc"])).unwrap(),
            "ka_live_abc"
        );
        assert_eq!(
            presented_key(&headers(&["bearer  ka_live_abc "])).unwrap(),
            "ka_live_abc"
        );
    }

    #[test]
    fn refuses_missing_and_garbled_headers() {
        assert_eq!(presented_key(&headers(&[])), Err(Refusal::MissingKey));
        for garbled in ["ka_live_abc", "Basic abc", "Bearer ", "Bearer a b"] {
            assert_eq!(
                presented_key(&headers(&[garbled])),
                Err(Refusal::MalformedHeader),
                "{garbled}"
            );
        }
        assert_eq!(
            presented_key(&headers(&["Bearer a", "Bearer b"])),
            Err(Refusal::MalformedHeader)
        );
        let long = format!("Bearer {}", "a".repeat(MAX_KEY_LEN + 1));
        assert!(matches!(
            presented_key(&headers(&[&long])),
            Err(Refusal::Verdict {
                code: VerifyCode::Malformed,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn cache_keys_depend_on_the_required_scopes() {
        let client = KeyAuthorityClient::connect_lazy("http://127.0.0.1:1").unwrap();
        let layer = VerifyKeyLayer::new(client);
        let scoped = layer.clone().require_scopes(["a"]);
        let other = layer.clone().require_scopes(["a", "b"]);
        let keys = [
            layer.cache_key("ka_live_x"),
            scoped.cache_key("ka_live_x"),
            other.cache_key("ka_live_x"),
            layer.cache_key("ka_live_y"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(keys[1], scoped.cache_key("ka_live_x"));
    }

    #[test]
    fn a_disabled_key_is_refused_like_a_revoked_one() {
        let disabled = Refusal::Verdict {
            code: VerifyCode::Disabled,
            retry_after: None,
        };
        assert_eq!(
            disabled.describe(),
            (
                Code::Unauthenticated,
                StatusCode::UNAUTHORIZED,
                "API_KEY_DISABLED",
                "the API key is disabled",
            )
        );
        let response: http::Response<String> = disabled.into_response(false, &[]);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }

    #[test]
    fn grpc_refusals_are_trailers_only() {
        let refusal = Refusal::Verdict {
            code: VerifyCode::Locked,
            retry_after: Some(Duration::from_millis(1500)),
        };
        let response: http::Response<String> = refusal.into_response(true, &[]);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(
            response.headers()["grpc-status"],
            (Code::ResourceExhausted as i32).to_string().as_str()
        );
        assert!(response.headers().contains_key("grpc-message"));
        assert!(response.headers().contains_key("grpc-status-details-bin"));
        assert!(response.body().is_empty());

        let response: http::Response<String> = refusal.into_response(false, &[]);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "2");
    }
}
