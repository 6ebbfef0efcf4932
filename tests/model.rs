//! Races, as a model: random sequences of IssueKey, VerifyKey, RotateKey, RevokeKey, UpdateKey
//! and clock advances against the real server, every answer and every listed key compared with a
//! small model of what it must be; and RotateKey racing RevokeKey on one key, many times.
//!
//! A test binary of its own, because it moves the process's clock forward
//! (`timestamp::advance_clock_for_tests`) so that keys expire without sleeping: no test of another
//! binary can see that, and the tests here take `CLOCK` in turn so that none sees another's
//! advances in the middle of a step. The state and verdict caches time themselves with real
//! `Instant`s, so an advance moves only the time expiry is decided with: a key whose cached state
//! said VALID must say EXPIRED the moment its expiry has passed.
//!
//! `PROPTEST_CASES` runs more sequences than CI's 32 (each up to `MAX_STEPS` steps). A failing
//! sequence is shrunk and its seed kept in `tests/model.proptest-regressions`, which is replayed
//! first on every later run.

#[allow(dead_code, unused_imports, unused_macros)]
#[path = "api/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "api/postgres_cluster.rs"]
mod postgres_cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence, TestRunner};

use common::{Backend, KeysClient, TestApp, TestDb, VerifyClient, reason, test_config};
use key_authority::pb;
use key_authority::pb::{KeyState, VerifyCode};
use key_authority::timestamp::{UnixMicros, advance_clock_for_tests, now_micros};

/// Held by every test of this binary for its whole run: see the module comment.
static CLOCK: Mutex<()> = Mutex::new(());

/// Sequences per run unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 32;
/// Steps per sequence, at most.
const MAX_STEPS: usize = 30;
/// Rounds of each RotateKey / RevokeKey race.
const RACE_ROUNDS: usize = 24;

const MICROS_PER_SECOND: i64 = 1_000_000;
/// RotateKey's grace period when the request sets none.
const DEFAULT_GRACE_SECONDS: u64 = 24 * 3600;
/// The scopes keys are issued with, and the ones verifies ask for (all but the last).
const SCOPES: [&str; 4] = ["read", "write", "admin", "full_access"];

#[test]
fn model_on_sqlite() {
    run_model(Backend::Sqlite);
}

#[test]
fn model_on_postgres() {
    run_model(Backend::Postgres);
}

#[test]
fn rotate_races_revoke_on_sqlite() {
    run_races(Backend::Sqlite);
}

#[test]
fn rotate_races_revoke_on_postgres() {
    run_races(Backend::Postgres);
}

// The operations and how they are drawn.

/// One step of a sequence. Keys are named by `Index` into the keys the sequence has so far
/// (issued or produced by rotations); a step on a key when there is none does nothing.
#[derive(Debug, Clone)]
enum Op {
    Issue {
        ttl_seconds: Option<u64>,
        scopes: Vec<&'static str>,
        usage_limit: i64,
    },
    Verify {
        key: Index,
        presented: Presented,
        required_scopes: Vec<&'static str>,
        cost: Option<i64>,
    },
    Rotate {
        key: Index,
        grace_seconds: Option<u64>,
        ttl_seconds: Option<u64>,
    },
    Revoke {
        key: Index,
        successors: bool,
    },
    SetScopes {
        key: Index,
        scopes: Vec<&'static str>,
    },
    SetEnabled {
        key: Index,
        enabled: bool,
    },
    /// Sets the expiry this long from now, or removes it.
    SetExpiry {
        key: Index,
        in_seconds: Option<u64>,
    },
    AdvanceClock {
        seconds: u64,
    },
}

impl Op {
    /// The key the step is on, if it is on one.
    fn key(&self) -> Option<&Index> {
        match self {
            Op::Issue { .. } | Op::AdvanceClock { .. } => None,
            Op::Verify { key, .. }
            | Op::Rotate { key, .. }
            | Op::Revoke { key, .. }
            | Op::SetScopes { key, .. }
            | Op::SetEnabled { key, .. }
            | Op::SetExpiry { key, .. } => Some(key),
        }
    }
}

/// What a verify presents for a key.
#[derive(Debug, Clone, Copy)]
enum Presented {
    /// Its secret.
    Right,
    /// Its key id with another secret (well formed, checksum and all).
    WrongSecret,
    /// A well-formed key of an id nobody issued.
    UnknownId,
}

/// Seconds to hours, with short spans common enough that expiries fall inside sequences.
fn seconds() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..=120, 60u64..=3 * 3600]
}

fn key_scopes() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(SCOPES.to_vec(), 0..=3)
}

fn required_scopes() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(SCOPES[..3].to_vec(), 0..=2)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            proptest::option::weighted(0.6, seconds()),
            key_scopes(),
            prop_oneof![Just(0i64), 1i64..=4],
        )
            .prop_map(|(ttl_seconds, scopes, usage_limit)| Op::Issue {
                ttl_seconds,
                scopes,
                usage_limit,
            }),
        5 => (
            any::<Index>(),
            prop_oneof![
                8 => Just(Presented::Right),
                1 => Just(Presented::WrongSecret),
                1 => Just(Presented::UnknownId),
            ],
            required_scopes(),
            prop_oneof![Just(None), (0i64..=2).prop_map(Some)],
        )
            .prop_map(|(key, presented, required_scopes, cost)| Op::Verify {
                key,
                presented,
                required_scopes,
                cost,
            }),
        4 => (
            any::<Index>(),
            prop_oneof![Just(None), Just(Some(0)), seconds().prop_map(Some)],
            proptest::option::weighted(0.25, seconds()),
        )
            .prop_map(|(key, grace_seconds, ttl_seconds)| Op::Rotate {
                key,
                grace_seconds,
                ttl_seconds,
            }),
        2 => (any::<Index>(), any::<bool>())
            .prop_map(|(key, successors)| Op::Revoke { key, successors }),
        1 => (any::<Index>(), key_scopes()).prop_map(|(key, scopes)| Op::SetScopes { key, scopes }),
        2 => (any::<Index>(), any::<bool>())
            .prop_map(|(key, enabled)| Op::SetEnabled { key, enabled }),
        1 => (any::<Index>(), proptest::option::weighted(0.7, seconds()))
            .prop_map(|(key, in_seconds)| Op::SetExpiry { key, in_seconds }),
        2 => seconds().prop_map(|seconds| Op::AdvanceClock { seconds }),
    ]
}

fn sequence() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..=MAX_STEPS)
}

// The model.

#[derive(Debug, Clone)]
struct ModelKey {
    key_id: String,
    secret: String,
    /// Empty: full access.
    scopes: BTreeSet<String>,
    expire_time: Option<UnixMicros>,
    revoked: bool,
    enabled: bool,
    rotated_from: Option<usize>,
    rotated_to: Option<usize>,
    usage_limit: i64,
    /// Index into `Model::budgets` for a usage-limited key: a rotation chain shares one.
    budget: Option<usize>,
}

impl ModelKey {
    /// As `Key::state_at`: revoked over expired over disabled.
    fn state_at(&self, now: UnixMicros) -> KeyState {
        if self.revoked {
            KeyState::Revoked
        } else if self.expire_time.is_some_and(|expiry| expiry <= now) {
            KeyState::Expired
        } else if !self.enabled {
            KeyState::Disabled
        } else {
            KeyState::Active
        }
    }

    fn grants(&self, required: &[&str]) -> bool {
        self.scopes.is_empty()
            || self.scopes.contains("full_access")
            || required.iter().all(|scope| self.scopes.contains(*scope))
    }
}

#[derive(Debug, Default)]
struct Model {
    keys: Vec<ModelKey>,
    /// Uses left, per budget.
    budgets: Vec<i64>,
}

impl Model {
    fn pick(&self, index: &Index) -> Option<usize> {
        (!self.keys.is_empty()).then(|| index.index(self.keys.len()))
    }

    fn remaining(&self, key: usize) -> i64 {
        self.keys[key]
            .budget
            .map_or(0, |budget| self.budgets[budget])
    }

    /// The verdict on `key`'s right secret at `now`.
    fn verdict(&self, key: usize, now: UnixMicros, required: &[&str], cost: i64) -> VerifyCode {
        let model = &self.keys[key];
        match model.state_at(now) {
            KeyState::Revoked => return VerifyCode::Revoked,
            KeyState::Expired => return VerifyCode::Expired,
            KeyState::Disabled => return VerifyCode::Disabled,
            _ => {}
        }
        if !model.grants(required) {
            return VerifyCode::InsufficientScope;
        }
        if model.usage_limit > 0 && self.remaining(key) < cost.max(1) {
            return VerifyCode::UsageExhausted;
        }
        VerifyCode::Valid
    }

    /// Why RotateKey must refuse `key` at `now` (the ErrorInfo reason), if it must.
    fn rotation_refusal(&self, key: usize, now: UnixMicros) -> Option<&'static str> {
        let model = &self.keys[key];
        match model.state_at(now) {
            KeyState::Revoked => Some("KEY_REVOKED"),
            KeyState::Expired => Some("KEY_EXPIRED"),
            KeyState::Disabled => Some("KEY_DISABLED"),
            _ if model.rotated_to.is_some() => Some("KEY_ALREADY_ROTATED"),
            _ => None,
        }
    }

    /// Why UpdateKey must refuse `key` at `now`, if it must, given the expiry it sets if it
    /// sets one: revoked and expired keys are final, and a rotated key cannot live longer than
    /// its grace period.
    fn update_refusal(
        &self,
        key: usize,
        now: UnixMicros,
        new_expiry: Option<Option<UnixMicros>>,
    ) -> Option<(tonic::Code, &'static str)> {
        let model = &self.keys[key];
        match model.state_at(now) {
            KeyState::Revoked => return Some((tonic::Code::FailedPrecondition, "KEY_REVOKED")),
            KeyState::Expired => return Some((tonic::Code::FailedPrecondition, "KEY_EXPIRED")),
            _ => {}
        }
        let lives_longer = match (new_expiry, model.expire_time) {
            (None, _) | (Some(_), None) => false,
            (Some(None), Some(_)) => true,
            (Some(Some(after)), Some(before)) => after > before,
        };
        if lives_longer && model.rotated_to.is_some() {
            return Some((tonic::Code::InvalidArgument, "INVALID_ARGUMENT"));
        }
        None
    }

    /// The keys `key`'s rotations led to, in order.
    fn successors(&self, key: usize) -> Vec<usize> {
        let mut chain = Vec::new();
        let mut next = self.keys[key].rotated_to;
        while let Some(successor) = next {
            chain.push(successor);
            next = self.keys[successor].rotated_to;
        }
        chain
    }
}

// Running a sequence against the server.

/// A mismatch between the server and the model: the message says which step and what.
type Checked = Result<(), String>;

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

/// `actual` must be what the model says at the start of the call or at its end (the two differ
/// only when an expiry fell within the call).
fn either<T: PartialEq + Debug>(what: &str, actual: T, at_start: T, at_end: T) -> Checked {
    ensure!(
        actual == at_start || actual == at_end,
        "{what}: the server says {actual:?}, the model {at_start:?} (or {at_end:?} by the end)"
    );
    Ok(())
}

/// A time the server answered, in microseconds.
fn micros(timestamp: &Option<prost_types::Timestamp>) -> Option<UnixMicros> {
    timestamp
        .as_ref()
        .map(|at| at.seconds * MICROS_PER_SECOND + i64::from(at.nanos) / 1_000)
}

fn proto_seconds(seconds: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: seconds as i64,
        nanos: 0,
    }
}

fn seconds_micros(seconds: u64) -> i64 {
    seconds as i64 * MICROS_PER_SECOND
}

/// `expiry` must be `seconds` after some instant of the call `[start, end]`.
fn check_expiry_after(
    what: &str,
    expiry: Option<UnixMicros>,
    start: UnixMicros,
    end: UnixMicros,
    seconds: u64,
) -> Checked {
    let low = start + seconds_micros(seconds);
    let high = end + seconds_micros(seconds);
    ensure!(
        expiry.is_some_and(|at| (low..=high).contains(&at)),
        "{what}: expire_time {expiry:?} is not {seconds} s after the call ({low}..={high})"
    );
    Ok(())
}

/// `text` (a whole key) with its id or its secret replaced by the same characters reversed, and
/// a checksum that matches: well formed, but not a key anybody holds.
fn forged(text: &str, presented: Presented) -> String {
    let (head, body) = text.rsplit_once('_').expect("a key has a prefix");
    let (key_id, secret) = body[..body.len() - 6].split_at(12);
    let reversed = |part: &str| part.chars().rev().collect::<String>();
    let checked = match presented {
        Presented::UnknownId => format!("{head}_{}{secret}", reversed(key_id)),
        Presented::WrongSecret | Presented::Right => format!("{head}_{key_id}{}", reversed(secret)),
    };
    let check = key_authority::key::format::checksum(checked.as_bytes());
    format!("{checked}{check}")
}

fn sorted(scopes: &[&str]) -> BTreeSet<String> {
    scopes.iter().map(|scope| (*scope).to_owned()).collect()
}

/// One sequence against one server, in a workspace of its own.
struct Case {
    keys: KeysClient,
    verify: VerifyClient,
    workspace_id: String,
    model: Model,
    seen: Seen,
}

/// How often each outcome came up in a run, so that a run can show it tested something.
type Seen = Arc<Mutex<BTreeMap<String, u64>>>;

impl Case {
    fn saw(&self, outcome: String) {
        *self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(outcome)
            .or_default() += 1;
    }

    async fn run(mut self, ops: &[Op]) -> Checked {
        for (step, op) in ops.iter().enumerate() {
            self.step(op)
                .await
                .map_err(|why| format!("step {step} ({op:?}): {why}"))?;
            self.check_every_key()
                .await
                .map_err(|why| format!("after step {step} ({op:?}): {why}"))?;
        }
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> Checked {
        let key = op.key().and_then(|index| self.model.pick(index));
        match (op, key) {
            (
                Op::Issue {
                    ttl_seconds,
                    scopes,
                    usage_limit,
                },
                _,
            ) => self.issue(*ttl_seconds, scopes, *usage_limit).await,
            (Op::AdvanceClock { seconds }, _) => {
                advance_clock_for_tests(Duration::from_secs(*seconds));
                Ok(())
            }
            // A step on a key, before there is any.
            (_, None) => Ok(()),
            (
                Op::Verify {
                    presented,
                    required_scopes,
                    cost,
                    ..
                },
                Some(key),
            ) => self.verify(key, *presented, required_scopes, *cost).await,
            (
                Op::Rotate {
                    grace_seconds,
                    ttl_seconds,
                    ..
                },
                Some(key),
            ) => self.rotate(key, *grace_seconds, *ttl_seconds).await,
            (Op::Revoke { successors, .. }, Some(key)) => self.revoke(key, *successors).await,
            (Op::SetScopes { scopes, .. }, Some(key)) => self.set_scopes(key, scopes).await,
            (Op::SetEnabled { enabled, .. }, Some(key)) => self.set_enabled(key, *enabled).await,
            (Op::SetExpiry { in_seconds, .. }, Some(key)) => {
                self.set_expiry(key, *in_seconds).await
            }
        }
    }

    async fn issue(
        &mut self,
        ttl_seconds: Option<u64>,
        scopes: &[&str],
        usage_limit: i64,
    ) -> Checked {
        let start = now_micros();
        let response = self
            .keys
            .issue_key(pb::IssueKeyRequest {
                workspace_id: self.workspace_id.clone(),
                name: "model".to_owned(),
                scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
                expiration: ttl_seconds
                    .map(|seconds| pb::issue_key_request::Expiration::Ttl(proto_seconds(seconds))),
                usage_limit,
                ..Default::default()
            })
            .await
            .map_err(|status| format!("IssueKey refused: {status:?}"))?
            .into_inner();
        let end = now_micros();
        let key = response.key.ok_or("IssueKey returned no key")?;
        let expire_time = micros(&key.expire_time);
        match ttl_seconds {
            Some(seconds) => check_expiry_after("IssueKey", expire_time, start, end, seconds)?,
            None => ensure!(
                expire_time.is_none(),
                "IssueKey set an expiry: {expire_time:?}"
            ),
        }
        ensure!(
            key.usage_limit == usage_limit && key.usage_remaining == usage_limit,
            "IssueKey: usage {} of {}, asked for {usage_limit}",
            key.usage_remaining,
            key.usage_limit
        );
        let budget = (usage_limit > 0).then(|| {
            self.model.budgets.push(usage_limit);
            self.model.budgets.len() - 1
        });
        self.model.keys.push(ModelKey {
            key_id: key.key_id,
            secret: response.secret,
            scopes: sorted(scopes),
            expire_time,
            revoked: false,
            enabled: true,
            rotated_from: None,
            rotated_to: None,
            usage_limit,
            budget,
        });
        Ok(())
    }

    async fn verify(
        &mut self,
        key: usize,
        presented: Presented,
        required_scopes: &[&str],
        cost: Option<i64>,
    ) -> Checked {
        let secret = &self.model.keys[key].secret;
        let text = match presented {
            Presented::Right => secret.clone(),
            Presented::WrongSecret | Presented::UnknownId => forged(secret, presented),
        };
        let start = now_micros();
        let response = self.verify_text(text, required_scopes, cost).await?;
        let end = now_micros();
        let code = VerifyCode::try_from(response.code).map_err(|_| "an unknown verify code")?;
        self.saw(format!("VerifyKey {}", code.as_str_name()));
        if !matches!(presented, Presented::Right) {
            ensure!(
                code == VerifyCode::NotFound && response.key.is_none(),
                "a forged key verified as {code:?}"
            );
            return Ok(());
        }
        let cost = cost.unwrap_or(1);
        either(
            "the verdict",
            code,
            self.model.verdict(key, start, required_scopes, cost),
            self.model.verdict(key, end, required_scopes, cost),
        )?;
        self.check_verdict_key(key, code, &response)?;
        if code == VerifyCode::Valid
            && let Some(budget) = self.model.keys[key].budget
        {
            self.model.budgets[budget] -= cost;
            let shown = response.key.as_ref().map_or(-1, |key| key.usage_remaining);
            ensure!(
                shown == self.model.budgets[budget],
                "VALID says {shown} uses remain, the model {}",
                self.model.budgets[budget]
            );
        }
        Ok(())
    }

    async fn verify_text(
        &mut self,
        key: String,
        required_scopes: &[&str],
        cost: Option<i64>,
    ) -> Result<pb::VerifyKeyResponse, String> {
        self.verify
            .verify_key(pb::VerifyKeyRequest {
                key,
                required_scopes: required_scopes.iter().map(|s| (*s).to_owned()).collect(),
                client_ip: String::new(),
                cost,
                minimum_role: 0,
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("VerifyKey failed: {status:?}"))
    }

    /// An identified key's verdict carries that key.
    fn check_verdict_key(
        &self,
        key: usize,
        code: VerifyCode,
        response: &pb::VerifyKeyResponse,
    ) -> Checked {
        ensure!(
            response.valid == (code == VerifyCode::Valid),
            "valid is {} for {code:?}",
            response.valid
        );
        let shown = response.key.as_ref().map(|key| key.key_id.as_str());
        ensure!(
            shown == Some(self.model.keys[key].key_id.as_str()),
            "{code:?} names key {shown:?}"
        );
        Ok(())
    }

    async fn rotate(
        &mut self,
        key: usize,
        grace_seconds: Option<u64>,
        ttl_seconds: Option<u64>,
    ) -> Checked {
        let start = now_micros();
        let result = self
            .keys
            .rotate_key(pb::RotateKeyRequest {
                workspace_id: self.workspace_id.clone(),
                key_id: self.model.keys[key].key_id.clone(),
                grace_period: grace_seconds.map(proto_seconds),
                expiration: ttl_seconds
                    .map(|seconds| pb::rotate_key_request::Expiration::Ttl(proto_seconds(seconds))),
                ..Default::default()
            })
            .await;
        let end = now_micros();
        let refusal = (
            self.model.rotation_refusal(key, start),
            self.model.rotation_refusal(key, end),
        );
        let response = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                ensure!(
                    status.code() == tonic::Code::FailedPrecondition,
                    "RotateKey failed: {status:?}"
                );
                let why = reason(&status);
                self.saw(format!("RotateKey refused {why}"));
                return either(
                    "RotateKey's refusal",
                    Some(why.as_str()),
                    refusal.0,
                    refusal.1,
                );
            }
        };
        either("RotateKey's refusal", None, refusal.0, refusal.1)?;
        self.saw("RotateKey ok".to_owned());
        let previous = response
            .previous_key
            .ok_or("RotateKey returned no previous key")?;
        let successor = response.key.ok_or("RotateKey returned no key")?;
        let old = &self.model.keys[key];
        // The old key ends at the end of the grace period, or when it was due to, if sooner.
        let grace = seconds_micros(grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS));
        let capped = |now: UnixMicros| {
            Some(
                old.expire_time
                    .map_or(now + grace, |at| at.min(now + grace)),
            )
        };
        let previous_expiry = micros(&previous.expire_time);
        ensure!(
            (capped(start)..=capped(end)).contains(&previous_expiry),
            "the rotated key ends at {previous_expiry:?}, not between {:?} and {:?}",
            capped(start),
            capped(end)
        );
        ensure!(
            previous.rotated_to_key_id == successor.key_id
                && successor.rotated_from_key_id == old.key_id,
            "the rotation is not linked both ways"
        );
        // The successor renews the secret, never the lifetime (unless asked), budget or reach.
        let successor_expiry = micros(&successor.expire_time);
        match ttl_seconds {
            Some(seconds) => {
                check_expiry_after("the successor", successor_expiry, start, end, seconds)?
            }
            None => ensure!(
                successor_expiry == old.expire_time,
                "the successor ends at {successor_expiry:?}, the old key at {:?}",
                old.expire_time
            ),
        }
        ensure!(
            successor.scopes.iter().cloned().collect::<BTreeSet<_>>() == old.scopes
                && successor.enabled
                && successor.usage_limit == old.usage_limit
                && successor.usage_remaining == self.model.remaining(key),
            "the successor differs from the old key: {successor:?}"
        );
        let mut next = old.clone();
        next.key_id = successor.key_id;
        next.secret = response.secret;
        next.expire_time = successor_expiry;
        next.rotated_from = Some(key);
        next.rotated_to = None;
        self.model.keys.push(next);
        let successor_index = self.model.keys.len() - 1;
        let old = &mut self.model.keys[key];
        old.expire_time = previous_expiry;
        old.rotated_to = Some(successor_index);
        Ok(())
    }

    async fn revoke(&mut self, key: usize, successors: bool) -> Checked {
        let response = self
            .keys
            .revoke_key(pb::RevokeKeyRequest {
                workspace_id: self.workspace_id.clone(),
                key_id: self.model.keys[key].key_id.clone(),
                revoke_successors: successors,
                ..Default::default()
            })
            .await
            .map_err(|status| format!("RevokeKey refused: {status:?}"))?
            .into_inner();
        let revoked = response.key.ok_or("RevokeKey returned no key")?;
        ensure!(
            revoked.state == KeyState::Revoked as i32 && revoked.revoke_time.is_some(),
            "RevokeKey answered a key that is not revoked: {revoked:?}"
        );
        let chain = if successors {
            self.model.successors(key)
        } else {
            Vec::new()
        };
        let expected: Vec<&str> = chain
            .iter()
            .map(|&k| self.model.keys[k].key_id.as_str())
            .collect();
        let answered: Vec<&str> = response
            .successors
            .iter()
            .map(|k| k.key_id.as_str())
            .collect();
        ensure!(
            answered == expected,
            "RevokeKey's successors: {answered:?}, the model's {expected:?}"
        );
        self.saw(format!("RevokeKey with {} successors", answered.len()));
        for revoked in std::iter::once(key).chain(chain) {
            self.model.keys[revoked].revoked = true;
        }
        Ok(())
    }

    /// UpdateKey with `mask`, checked against the model's refusal; `Some(key)` when it applied.
    async fn update(
        &mut self,
        key: usize,
        changes: pb::Key,
        mask: &str,
    ) -> Result<Option<pb::Key>, String> {
        let new_expiry = (mask == "expire_time").then(|| micros(&changes.expire_time));
        let start = now_micros();
        let result = self
            .keys
            .update_key(pb::UpdateKeyRequest {
                key: Some(pb::Key {
                    workspace_id: self.workspace_id.clone(),
                    key_id: self.model.keys[key].key_id.clone(),
                    ..changes
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![mask.to_owned()],
                }),
                ..Default::default()
            })
            .await;
        let end = now_micros();
        let refusal = (
            self.model.update_refusal(key, start, new_expiry),
            self.model.update_refusal(key, end, new_expiry),
        );
        match result {
            Ok(response) => {
                either("UpdateKey's refusal", None, refusal.0, refusal.1)?;
                self.saw("UpdateKey ok".to_owned());
                let updated = response.into_inner().key;
                Ok(Some(updated.ok_or("UpdateKey returned no key")?))
            }
            Err(status) => {
                let why = reason(&status);
                self.saw(format!("UpdateKey refused {why}"));
                let refused = Some((status.code(), why.as_str()));
                either("UpdateKey's refusal", refused, refusal.0, refusal.1)?;
                Ok(None)
            }
        }
    }

    async fn set_scopes(&mut self, key: usize, scopes: &[&str]) -> Checked {
        let changes = pb::Key {
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            ..Default::default()
        };
        if let Some(updated) = self.update(key, changes, "scopes").await? {
            let shown: BTreeSet<String> = updated.scopes.into_iter().collect();
            ensure!(shown == sorted(scopes), "UpdateKey set scopes {shown:?}");
            self.model.keys[key].scopes = shown;
        }
        Ok(())
    }

    async fn set_enabled(&mut self, key: usize, enabled: bool) -> Checked {
        let changes = pb::Key {
            enabled,
            ..Default::default()
        };
        if let Some(updated) = self.update(key, changes, "enabled").await? {
            ensure!(
                updated.enabled == enabled,
                "UpdateKey left enabled {}",
                updated.enabled
            );
            self.model.keys[key].enabled = enabled;
        }
        Ok(())
    }

    async fn set_expiry(&mut self, key: usize, in_seconds: Option<u64>) -> Checked {
        let at = in_seconds.map(|seconds| now_micros() + seconds_micros(seconds));
        let changes = pb::Key {
            expire_time: at.map(key_authority::timestamp::to_proto),
            ..Default::default()
        };
        if let Some(updated) = self.update(key, changes, "expire_time").await? {
            let shown = micros(&updated.expire_time);
            ensure!(
                shown == at,
                "UpdateKey set expire_time {shown:?}, asked for {at:?}"
            );
            self.model.keys[key].expire_time = at;
        }
        Ok(())
    }

    /// After every step: the workspace's listing (all keys, and the active ones) and a check of
    /// every key's right secret (cost 0: consumes nothing) agree with the model.
    async fn check_every_key(&mut self) -> Checked {
        self.check_listing().await?;
        for key in 0..self.model.keys.len() {
            let start = now_micros();
            let secret = self.model.keys[key].secret.clone();
            let response = self.verify_text(secret, &[], Some(0)).await?;
            let end = now_micros();
            let code = VerifyCode::try_from(response.code).map_err(|_| "an unknown verify code")?;
            let key_id = &self.model.keys[key].key_id;
            either(
                &format!("the verdict on key {key} ({key_id})"),
                code,
                self.model.verdict(key, start, &[], 0),
                self.model.verdict(key, end, &[], 0),
            )?;
            self.check_verdict_key(key, code, &response)?;
            self.saw(format!("check {}", code.as_str_name()));
        }
        Ok(())
    }

    async fn list(&mut self, include_inactive: bool) -> Result<pb::ListKeysResponse, String> {
        self.keys
            .list_keys(pb::ListKeysRequest {
                workspace_id: self.workspace_id.clone(),
                page_size: 1000,
                include_inactive,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("ListKeys failed: {status:?}"))
    }

    async fn check_listing(&mut self) -> Checked {
        let start = now_micros();
        let all = self.list(true).await?;
        let active = self.list(false).await?;
        let end = now_micros();
        let model = &self.model;
        let by_id: BTreeMap<&str, usize> = model
            .keys
            .iter()
            .enumerate()
            .map(|(index, key)| (key.key_id.as_str(), index))
            .collect();
        let listed: BTreeSet<&str> = all.keys.iter().map(|key| key.key_id.as_str()).collect();
        let expected: BTreeSet<&str> = by_id.keys().copied().collect();
        ensure!(
            listed == expected && all.keys.len() == expected.len(),
            "ListKeys (include_inactive) lists {listed:?}, the model has {expected:?}"
        );
        ensure!(
            all.total_size == expected.len() as i64,
            "ListKeys (include_inactive) counts {} keys, the model {}",
            all.total_size,
            expected.len()
        );
        let id_of =
            |index: Option<usize>| index.map_or("", |index| model.keys[index].key_id.as_str());
        for shown in &all.keys {
            let index = by_id[shown.key_id.as_str()];
            let key = &model.keys[index];
            let what = format!("listed key {index} ({})", key.key_id);
            either(
                &format!("{what}: state"),
                KeyState::try_from(shown.state).ok(),
                Some(key.state_at(start)),
                Some(key.state_at(end)),
            )?;
            let scopes: BTreeSet<String> = shown.scopes.iter().cloned().collect();
            ensure!(
                scopes == key.scopes
                    && shown.enabled == key.enabled
                    && micros(&shown.expire_time) == key.expire_time
                    && shown.revoke_time.is_some() == key.revoked
                    && shown.rotated_from_key_id == id_of(key.rotated_from)
                    && shown.rotated_to_key_id == id_of(key.rotated_to)
                    && shown.usage_limit == key.usage_limit
                    && shown.usage_remaining == model.remaining(index),
                "{what} differs from the model: {shown:?}, model {key:?} with {} uses left",
                model.remaining(index)
            );
        }
        // Active: listed without include_inactive. A key whose expiry fell within the calls may
        // be either.
        let listed_active: BTreeSet<&str> =
            active.keys.iter().map(|key| key.key_id.as_str()).collect();
        for (index, key) in model.keys.iter().enumerate() {
            let at_start = key.state_at(start) == KeyState::Active;
            let at_end = key.state_at(end) == KeyState::Active;
            let listed = listed_active.contains(key.key_id.as_str());
            ensure!(
                listed == at_start || listed == at_end,
                "key {index} ({}) is {}listed as active, but its state is {:?}",
                key.key_id,
                if listed { "" } else { "not " },
                key.state_at(end)
            );
        }
        ensure!(
            listed_active.len() == active.keys.len() && listed_active.is_subset(&expected),
            "ListKeys lists unknown or repeated keys: {listed_active:?}"
        );
        Ok(())
    }
}

// The harness.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn test_db(backend: Backend) -> Option<TestDb> {
    match backend {
        Backend::Sqlite => Some(TestDb::sqlite().await),
        Backend::Postgres => TestDb::postgres().await,
    }
}

/// A test server whose verdicts the model can predict exactly: no lockouts (the model presents
/// wrong secrets) and no rate on unproven secrets (every key's first verify is one).
fn model_config(db: &TestDb) -> key_authority::server::Config {
    let mut config = test_config(db);
    config.verify.lockout.key_failures = 0;
    config.verify.lockout.ip_failures = 0;
    config.argon2_unproven.per_second = 0;
    config
}

fn proptest_config() -> ProptestConfig {
    let mut config = ProptestConfig {
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    };
    // The default reads PROPTEST_CASES; without it, few enough cases for CI.
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config
}

fn run_model(backend: Backend) {
    let _clock = CLOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = runtime();
    let Some(db) = runtime.block_on(test_db(backend)) else {
        return;
    };
    let app = runtime.block_on(TestApp::spawn_with(model_config(&db)));
    let workspaces = AtomicU64::new(0);
    let seen = Seen::default();
    let mut runner = TestRunner::new(proptest_config());
    let result = runner.run(&sequence(), |ops| {
        let case = Case {
            keys: app.keys.clone(),
            verify: app.verify.clone(),
            workspace_id: format!("model-{}", workspaces.fetch_add(1, Ordering::Relaxed)),
            model: Model::default(),
            seen: seen.clone(),
        };
        runtime
            .block_on(case.run(&ops))
            .map_err(proptest::test_runner::TestCaseError::fail)
    });
    runtime.block_on(app.stop());
    if let Err(failure) = result {
        panic!("{backend:?}: {failure}");
    }
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    eprintln!(
        "{backend:?}: {} sequences, outcomes: {seen:#?}",
        workspaces.into_inner()
    );
}

// RotateKey racing RevokeKey on one key.

fn run_races(backend: Backend) {
    let _clock = CLOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = runtime();
    let Some(db) = runtime.block_on(test_db(backend)) else {
        return;
    };
    runtime.block_on(async {
        // A warm state cache, which the revocation must invalidate; and one whose entries are
        // fresh for a millisecond only, so that database reads of the key's state race the
        // revocation's write as well.
        let state_ttls = [
            ("warm", Duration::from_secs(5)),
            ("cold", Duration::from_millis(1)),
        ];
        for (cache, state_ttl) in state_ttls {
            let mut config = model_config(&db);
            config.verify.state_ttl = state_ttl;
            let app = TestApp::spawn_with(config).await;
            let mut rotation_first = 0;
            let mut verified_after = 0;
            // How long the last rotation took: the revocations start within about that.
            let mut rotation_time = Duration::from_millis(5);
            for round in 0..RACE_ROUNDS {
                let workspace_id = format!("race-{cache}-{round}");
                // 0 to 1.5 times a rotation's time, so that either may commit first, and often
                // while the rotation is between its read and its write.
                let head_start = rotation_time * (round % 7) as u32 / 4;
                match race_round(&app, &workspace_id, round, head_start).await {
                    Ok(outcome) => {
                        rotation_first += usize::from(outcome.rotated);
                        verified_after += outcome.verified_after_revoke;
                        rotation_time = outcome.rotation_time;
                    }
                    Err(why) => panic!("{backend:?}, {cache} cache, round {round}: {why}"),
                }
            }
            eprintln!(
                "{backend:?}, {cache} cache: the rotation won {rotation_first} of {RACE_ROUNDS} \
                 races; {verified_after} verifies after RevokeKey returned"
            );
            app.stop().await;
        }
    });
}

/// How a race came out.
struct RaceOutcome {
    /// A rotation committed (before the revocation).
    rotated: bool,
    /// Verifies of the revoked key that started after RevokeKey returned (none VALID).
    verified_after_revoke: usize,
    /// How long the first RotateKey call took.
    rotation_time: Duration,
}

/// Issues a key, proves its secret, then rotates it (once or twice at once) while revoking it
/// (alone, or with its successors), with a VerifyKey loop running throughout.
async fn race_round(
    app: &TestApp,
    workspace_id: &str,
    round: usize,
    head_start: Duration,
) -> Result<RaceOutcome, String> {
    let revoke_successors = round.is_multiple_of(2);
    let two_rotations = !round.is_multiple_of(3);
    let mut keys = app.keys.clone();
    let issued = keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: workspace_id.to_owned(),
            name: "race".to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("IssueKey refused: {status:?}"))?
        .into_inner();
    let key_id = issued.key.ok_or("IssueKey returned no key")?.key_id;
    let secret = issued.secret;
    let warm = verify_code(app.verify.clone(), &secret).await?;
    ensure!(warm == VerifyCode::Valid, "a new key verifies as {warm:?}");

    let revoke_returned = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(verify_until_stopped(
        app.verify.clone(),
        secret.clone(),
        revoke_returned.clone(),
        stop.clone(),
    ));
    let rotate = |mut keys: KeysClient| {
        let request = pb::RotateKeyRequest {
            workspace_id: workspace_id.to_owned(),
            key_id: key_id.clone(),
            grace_period: Some(proto_seconds(3600)),
            ..Default::default()
        };
        async move {
            keys.rotate_key(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    // RevokeKey is one short transaction, RotateKey a read, an argon2 hash and a write: the
    // revocation starts `head_start` later.
    let revoke = async {
        tokio::time::sleep(head_start).await;
        let revoked = keys
            .revoke_key(pb::RevokeKeyRequest {
                workspace_id: workspace_id.to_owned(),
                key_id: key_id.clone(),
                revoke_successors,
                ..Default::default()
            })
            .await;
        revoke_returned.store(true, Ordering::SeqCst);
        revoked
    };
    let second = async {
        if two_rotations {
            Some(rotate(app.keys.clone()).await)
        } else {
            None
        }
    };
    let first = async {
        let started = std::time::Instant::now();
        let rotated = rotate(app.keys.clone()).await;
        (rotated, started.elapsed())
    };
    let ((first, rotation_time), second, revocation) = tokio::join!(first, second, revoke);

    // On this replica, right after RevokeKey returned, and in the loop that ran meanwhile.
    let after = verify_code(app.verify.clone(), &secret).await?;
    ensure!(
        after == VerifyCode::Revoked,
        "the revoked key verifies as {after:?}"
    );
    stop.store(true, Ordering::SeqCst);
    let verified_after = watcher
        .await
        .map_err(|error| format!("the verify loop: {error}"))??;
    ensure!(verified_after > 0, "no verify ran after RevokeKey returned");
    let revocation = revocation
        .map_err(|status| format!("RevokeKey refused: {status:?}"))?
        .into_inner();

    let mut rotated = Vec::new();
    for rotation in std::iter::once(first).chain(second) {
        match rotation {
            Ok(response) => rotated.push(response),
            Err(status) => {
                let why = reason(&status);
                let expected = match status.code() {
                    tonic::Code::FailedPrecondition => {
                        why == "KEY_REVOKED" || why == "KEY_ALREADY_ROTATED"
                    }
                    tonic::Code::Aborted => true,
                    _ => false,
                };
                ensure!(expected, "RotateKey failed unexpectedly: {status:?}");
            }
        }
    }
    ensure!(
        rotated.len() <= 1,
        "{} rotations of one key succeeded",
        rotated.len()
    );

    let list = |include_inactive| {
        let mut keys = app.keys.clone();
        let request = pb::ListKeysRequest {
            workspace_id: workspace_id.to_owned(),
            page_size: 1000,
            include_inactive,
            ..Default::default()
        };
        async move {
            keys.list_keys(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| format!("ListKeys failed: {status:?}"))
        }
    };
    let all = list(true).await?;
    let active = list(false).await?;
    let original = all
        .keys
        .iter()
        .find(|key| key.key_id == key_id)
        .ok_or("the key is not listed")?;
    let successors: Vec<&pb::Key> = all
        .keys
        .iter()
        .filter(|key| key.rotated_from_key_id == key_id)
        .collect();
    ensure!(
        successors.len() == rotated.len() && all.keys.len() == 1 + successors.len(),
        "{} successors listed, {} rotations succeeded, {} keys in all",
        successors.len(),
        rotated.len(),
        all.keys.len()
    );
    ensure!(
        original.state == KeyState::Revoked as i32
            && original.rotated_to_key_id
                == successors.first().map_or("", |key| key.key_id.as_str()),
        "the key is listed as {original:?}"
    );
    for key in &active.keys {
        ensure!(
            key.revoke_time.is_none()
                && key.state == KeyState::Active as i32
                && key.key_id != key_id,
            "a revoked key is listed as active: {key:?}"
        );
    }
    let revoked_successors: Vec<&str> = revocation
        .successors
        .iter()
        .map(|key| key.key_id.as_str())
        .collect();
    let Some(rotation) = rotated.first() else {
        ensure!(
            revoked_successors.is_empty(),
            "RevokeKey revoked successors {revoked_successors:?} of none"
        );
        return Ok(RaceOutcome {
            rotated: false,
            verified_after_revoke: verified_after,
            rotation_time,
        });
    };
    // A rotation that succeeded committed before the revocation (it needs its key unrevoked), so
    // a revocation with successors found and revoked its successor, and one without left it be.
    let successor = rotation.key.as_ref().ok_or("RotateKey returned no key")?;
    ensure!(
        successor.key_id == successors[0].key_id,
        "RotateKey's key is not the one listed"
    );
    let code = verify_code(app.verify.clone(), &rotation.secret).await?;
    let (expected_code, expected_state, expected_revoked) = if revoke_successors {
        (
            VerifyCode::Revoked,
            KeyState::Revoked,
            vec![successor.key_id.as_str()],
        )
    } else {
        (VerifyCode::Valid, KeyState::Active, Vec::new())
    };
    ensure!(
        code == expected_code
            && successors[0].state == expected_state as i32
            && revoked_successors == expected_revoked,
        "revoke_successors {revoke_successors}: the successor verifies as {code:?}, is listed as \
         {:?}, RevokeKey revoked {revoked_successors:?}",
        successors[0]
    );
    Ok(RaceOutcome {
        rotated: true,
        verified_after_revoke: verified_after,
        rotation_time,
    })
}

async fn verify_code(mut verify: VerifyClient, key: &str) -> Result<VerifyCode, String> {
    let response = verify
        .verify_key(pb::VerifyKeyRequest {
            key: key.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("VerifyKey failed: {status:?}"))?
        .into_inner();
    VerifyCode::try_from(response.code).map_err(|_| "an unknown verify code".to_owned())
}

/// Verifies `key` until stopped; fails on a VALID verdict from a call that started after
/// RevokeKey returned. Returns how many such calls it made.
async fn verify_until_stopped(
    verify: VerifyClient,
    key: String,
    revoke_returned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<usize, String> {
    let mut after = 0;
    loop {
        let revoked_before_the_call = revoke_returned.load(Ordering::SeqCst);
        let code = verify_code(verify.clone(), &key).await?;
        if revoked_before_the_call {
            ensure!(
                code != VerifyCode::Valid,
                "VALID from a VerifyKey started after RevokeKey returned"
            );
            after += 1;
        }
        if stop.load(Ordering::SeqCst) && after > 0 {
            return Ok(after);
        }
    }
}
