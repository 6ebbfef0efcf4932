//! The one decision both gateways share: a presented key and a route's requirement in, the
//! verifier's verdict out, rendered as an HTTP answer (a status, a stable code, a message and
//! `Retry-After`) or as the identity the upstream receives. The verdict is VerifyKey's, from the
//! same verifier: the same caches, lockouts, usage counts and verdict metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::routes::{GatewayRoutes, Requirement};
use crate::error::Error;
use crate::grpc::verdict_code;
use crate::key::{Environment, Key};
use crate::metrics::Metrics;
use crate::verify::{ClientIp, Verdict, Verifier, VerifyRequest};

/// Which gateway asked, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayKind {
    ExtAuthz,
    ForwardAuth,
}

impl GatewayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExtAuthz => "ext_authz",
            Self::ForwardAuth => "forward_auth",
        }
    }
}

/// Why a request was refused, with the HTTP status and stable code of README's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingKey,
    InvalidKey(&'static str),
    InsufficientScope,
    InsufficientRole,
    Locked(Duration),
    TrialExhausted,
    UsageExhausted,
    /// The authority could not decide (database unreachable, argon2 or the server overloaded,
    /// deadline passed): never a 401, so a client retries instead of dropping its key.
    Unavailable(Duration),
    /// The gateway's own configuration is wrong (a context extension that is not a scope).
    Misconfigured(&'static str),
    /// The caller of the gateway endpoint is not one of the configured front ends: the proxy's
    /// configuration lacks its verify token. A 500, not a 401: the client's key was never
    /// judged, and a 401 would tell it to drop a good one.
    UnknownGateway,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Self::MissingKey | Self::InvalidKey(_) => 401,
            Self::InsufficientScope | Self::InsufficientRole => 403,
            Self::Locked(_) | Self::UsageExhausted => 429,
            Self::TrialExhausted => 402,
            Self::Unavailable(_) => 503,
            Self::Misconfigured(_) | Self::UnknownGateway => 500,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::MissingKey => "MISSING_AUTH_HEADER",
            Self::InvalidKey(_) => "INVALID_API_KEY",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::InsufficientRole => "INSUFFICIENT_ROLE",
            Self::Locked(_) => "BRUTE_FORCE_LOCKOUT",
            Self::TrialExhausted => "TRIAL_OPS_EXHAUSTED",
            Self::UsageExhausted => "USAGE_EXHAUSTED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Misconfigured(_) => "GATEWAY_MISCONFIGURED",
            Self::UnknownGateway => "GATEWAY_MISCONFIGURED",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::MissingKey => {
                "no API key: send it as `Authorization: Bearer <key>` or in the API key header"
            }
            Self::InvalidKey(message) | Self::Misconfigured(message) => message,
            Self::InsufficientScope => "the API key lacks a scope this route requires",
            Self::InsufficientRole => "the API key's role is below the role this route requires",
            Self::Locked(_) => {
                "too many failed attempts for this key or from this address: retry later"
            }
            Self::TrialExhausted => "the trial key has used all of its operations",
            Self::UsageExhausted => "the API key has used all of its usage limit",
            Self::Unavailable(_) => "the key authority could not decide: retry later",
            Self::UnknownGateway => {
                "the gateway is not allowed to ask: its verify token is missing or unknown"
            }
        }
    }

    /// Seconds to wait, for `Retry-After`: rounded up, at least 1.
    pub fn retry_after_seconds(self) -> Option<u64> {
        match self {
            Self::Locked(wait) | Self::Unavailable(wait) => {
                Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).map(|secs| secs.max(1))
            }
            _ => None,
        }
    }

    /// `WWW-Authenticate` for a 401 or a missing scope (RFC 6750's error codes).
    pub fn www_authenticate(self) -> Option<&'static str> {
        match self {
            Self::MissingKey => Some("Bearer"),
            Self::InvalidKey(_) => Some("Bearer error=\"invalid_token\""),
            Self::InsufficientScope => Some("Bearer error=\"insufficient_scope\""),
            _ => None,
        }
    }

    /// The JSON body: `{"error": {"code": ..., "message": ...}}`.
    pub fn body(self) -> String {
        serde_json::json!({
            "error": { "code": self.code(), "message": self.message() }
        })
        .to_string()
    }
}

/// The verified key's identity, for the upstream's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub workspace: String,
    pub role: &'static str,
    pub environment: &'static str,
    /// Space separated, as OAuth writes scopes; empty for a full-access key with none.
    pub scopes: String,
}

impl Identity {
    fn of(key: &Key) -> Self {
        Self {
            key_id: key.key_id.as_str().to_owned(),
            workspace: key.workspace_id.as_str().to_owned(),
            role: key.role.as_str(),
            environment: key.environment.as_str(),
            scopes: key.scopes.as_slice().join(" "),
        }
    }

    /// (header name, value) pairs, with the names the gateway file gives.
    pub fn headers<'a>(&'a self, routes: &'a GatewayRoutes) -> [(&'a str, &'a str); 5] {
        let names = &routes.identity_headers;
        [
            (&names.key_id, &self.key_id),
            (&names.workspace, &self.workspace),
            (&names.role, self.role),
            (&names.environment, self.environment),
            (&names.scopes, &self.scopes),
        ]
    }
}

/// What a gateway answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Identity),
    Refuse(Refusal),
}

impl Decision {
    /// The metrics label: OK or the refusal's code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Allow(_) => "OK",
            Self::Refuse(refusal) => refusal.code(),
        }
    }
}

/// The verifier and the gateway file, shared by both gateways.
pub struct Gateway {
    verifier: Arc<Verifier>,
    metrics: Arc<Metrics>,
    pub routes: Arc<GatewayRoutes>,
}

/// One check, as a gateway parsed it.
#[derive(Debug)]
pub struct Check<'a> {
    /// None: no key was presented.
    pub key: Option<&'a str>,
    pub requirement: &'a Requirement,
    pub client_ip: Option<ClientIp>,
}

impl Gateway {
    pub fn new(verifier: Arc<Verifier>, metrics: Arc<Metrics>, routes: Arc<GatewayRoutes>) -> Self {
        Self {
            verifier,
            metrics,
            routes,
        }
    }

    /// Decides on one check, and counts it.
    pub async fn decide(&self, gateway: GatewayKind, check: Check<'_>) -> Decision {
        let started = Instant::now();
        let decision = self.verdict(check).await;
        self.count(gateway, &decision, started);
        decision
    }

    /// Counts a decision (made here, or a gateway's own refusal) and records it on the span.
    pub fn count(&self, gateway: GatewayKind, decision: &Decision, started: Instant) {
        self.metrics
            .record_gateway(gateway.as_str(), decision.code(), started.elapsed());
        tracing::Span::current().record("gateway.code", decision.code());
    }

    async fn verdict(&self, check: Check<'_>) -> Decision {
        let Some(key) = check.key else {
            return Decision::Refuse(Refusal::MissingKey);
        };
        let question = VerifyRequest {
            key,
            required_scopes: &check.requirement.scopes,
            client_ip: check.client_ip,
            cost: check.requirement.cost,
            minimum_role: check.requirement.minimum_role,
        };
        match self.verifier.verify(question).await {
            Ok(verdict) => {
                self.metrics
                    .record_verdict(verdict_code(&verdict).as_str_name());
                decision(&verdict)
            }
            Err(error) => Decision::Refuse(cannot_decide(&error)),
        }
    }
}

/// A verdict in a gateway's words.
fn decision(verdict: &Verdict) -> Decision {
    let refusal = match verdict {
        Verdict::Valid(..) => {
            return match verdict.key() {
                Some(key) => Decision::Allow(Identity::of(key)),
                // A VALID verdict always carries its key; refuse rather than guess.
                None => Decision::Refuse(Refusal::Unavailable(Duration::from_secs(1))),
            };
        }
        Verdict::Malformed | Verdict::NotFound => Refusal::InvalidKey("the API key is not valid"),
        Verdict::Revoked(_) => Refusal::InvalidKey("the API key was revoked"),
        Verdict::Expired(_) => Refusal::InvalidKey("the API key has expired"),
        Verdict::Disabled(_) => Refusal::InvalidKey("the API key is disabled"),
        Verdict::InsufficientScope(_) => Refusal::InsufficientScope,
        Verdict::InsufficientRole(_) => Refusal::InsufficientRole,
        Verdict::Locked(wait) => Refusal::Locked(*wait),
        Verdict::UsageExhausted(_) => match verdict.key() {
            Some(key) if key.environment == Environment::Trial => Refusal::TrialExhausted,
            _ => Refusal::UsageExhausted,
        },
    };
    Decision::Refuse(refusal)
}

/// The verifier could not decide: 503 with the error's own retry delay (one second at least).
pub fn cannot_decide(error: &Error) -> Refusal {
    Refusal::Unavailable(error.retry_after().unwrap_or(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_the_documented_status_and_code() {
        let table = [
            (Refusal::MissingKey, 401, "MISSING_AUTH_HEADER"),
            (Refusal::InvalidKey("x"), 401, "INVALID_API_KEY"),
            (Refusal::InsufficientScope, 403, "INSUFFICIENT_SCOPE"),
            (Refusal::InsufficientRole, 403, "INSUFFICIENT_ROLE"),
            (
                Refusal::Locked(Duration::from_secs(3)),
                429,
                "BRUTE_FORCE_LOCKOUT",
            ),
            (Refusal::TrialExhausted, 402, "TRIAL_OPS_EXHAUSTED"),
            (Refusal::UsageExhausted, 429, "USAGE_EXHAUSTED"),
            (
                Refusal::Unavailable(Duration::from_secs(1)),
                503,
                "UNAVAILABLE",
            ),
        ];
        for (refusal, status, code) in table {
            assert_eq!(refusal.status(), status, "{refusal:?}");
            assert_eq!(refusal.code(), code, "{refusal:?}");
            let body: serde_json::Value = serde_json::from_str(&refusal.body()).unwrap();
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["message"], refusal.message());
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let wait = |millis| Refusal::Locked(Duration::from_millis(millis)).retry_after_seconds();
        assert_eq!(wait(0), Some(1));
        assert_eq!(wait(100), Some(1));
        assert_eq!(wait(1000), Some(1));
        assert_eq!(wait(1001), Some(2));
        assert_eq!(wait(899_500), Some(900));
        assert_eq!(Refusal::UsageExhausted.retry_after_seconds(), None);
    }
}
