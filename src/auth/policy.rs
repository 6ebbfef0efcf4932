//! Every rule that decides whether a caller may do a thing, as pure functions: the role matrix,
//! workspace sealing, role ceilings, trial-key rules, which API keys may authenticate, and whose
//! word on an end user's address is taken. The domain (`keys`) calls them; nothing else decides.
//!
//! | | admin | viewer | developer | account_admin | API key |
//! |---|---|---|---|---|---|
//! | IssueKey | yes | no | yes | yes | never |
//! | GetKey, ListKeys, ListAuditEvents, WatchKeyEvents | yes | yes | yes | yes | viewer and up |
//! | WatchKeyEvents of every workspace | yes | no | no | no | never |
//! | RevokeKey, RotateKey | yes | no | yes | yes | developer and up, or itself |
//! | RevokeKey with revoke_successors | yes | no | yes | yes | developer and up |
//! | RotateKey: set the successor's expiry | yes | no | yes | yes | never |
//! | RotateKey: longest grace period | server cap | - | server cap | server cap | 24 h |
//! | UpdateKey | yes | no | yes | yes | developer and up, or itself |
//! | UpdateKey: make a key live longer | yes | no | yes | yes | never |
//! | UpdateKey: widen itself (scopes, role) | - | - | - | - | never |
//! | ReportUsage (keys of its own workspace only) | yes | no | yes | yes | developer and up |
//! | CreateWebhook, ListWebhooks, DeleteWebhook, ListWebhookDeliveries, RedeliverWebhookEvent | yes | no | yes | yes | developer and up |
//!
//! Nobody grants a role above their own, nor changes (rotates, updates) a key whose role is above
//! their own. IssueKey never makes trial keys; a dashboard JWT never
//! carries the trial role; a trial key may not call KeyService at all. A usage-limited API key that
//! has used up its verifications may still manage keys (the limit meters VerifyKey). The end
//! user's address in IssueTrialKey / RevokeTrialKey is taken from the request only from a trusted
//! front end (a caller with an admin or verify token), otherwise it is the connection's peer.

use std::time::Duration;

use crate::audit::AuditActor;
use crate::error::{Error, Result};
use crate::key::{Environment, Key, Role, WorkspaceId};
use crate::timestamp::UnixMicros;
use crate::verify::{ClientIp, Verdict};

/// The longest an API key may keep the key it rotates working: whoever holds a key can renew
/// its secret, never stretch how long the old one lives.
pub const API_KEY_MAX_ROTATION_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// Who asked for a change: the text kept in a key's `created_by` / `revoked_by`, and the actor
/// of its audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    text: String,
    audit: AuditActor,
}

impl Actor {
    pub fn new(text: String, audit: AuditActor) -> Self {
        Self { text, audit }
    }

    /// The platform admin.
    pub fn admin() -> Self {
        Self::new("admin".to_owned(), AuditActor::admin())
    }

    /// An anonymous caller of the trial RPCs, known by the end user's address.
    pub fn trial(client_ip: &str) -> Self {
        Self::new("trial".to_owned(), AuditActor::anonymous(client_ip))
    }

    /// `admin`, `user:<sub>`, `key:<prefix> (<name>)` or `trial`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn audit(&self) -> &AuditActor {
        &self.audit
    }
}

/// What the caller of a rotation may ask for beyond a new secret (decided by the caller's kind
/// and role: `Caller::rotation_rights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationRights {
    /// May give the successor a new expiry: only callers that may issue keys.
    pub may_set_expiry: bool,
    /// A grace cap of the caller's own, below the server's; `None` for the server's alone.
    pub grace_cap: Option<Duration>,
    /// The highest role the caller may hold through a rotation; `None` is no limit.
    pub role_ceiling: Option<Role>,
}

impl RotationRights {
    /// Refuses a successor expiry the caller may not set.
    pub fn permit_expiry(&self) -> Result<()> {
        if self.may_set_expiry {
            return Ok(());
        }
        Err(Error::InsufficientRole(
            "only a caller that may issue keys can set a successor's expiry; \
             a rotation by an API key renews its secret, never its lifetime"
                .to_owned(),
        ))
    }

    /// Refuses rotating a key whose role is above the caller's: a rotation mints a new secret
    /// with the old key's role, as much a grant as IssueKey.
    pub fn permit_role(&self, role: Role) -> Result<()> {
        match self.role_ceiling {
            Some(ceiling) if role > ceiling => Err(Error::InsufficientRole(format!(
                "a {} cannot rotate a key with the role {}",
                ceiling.as_str(),
                role.as_str()
            ))),
            _ => Ok(()),
        }
    }
}

/// IssueKey makes no trial keys: those come from IssueTrialKey only, with its limits.
pub fn check_issuable(role: Role, environment: Environment) -> Result<()> {
    if role == Role::Trial {
        return Err(Error::invalid(
            "role",
            "trial keys are issued by IssueTrialKey only",
        ));
    }
    if environment == Environment::Trial {
        return Err(Error::invalid(
            "environment",
            "trial keys are issued by IssueTrialKey only",
        ));
    }
    Ok(())
}

/// The role a dashboard JWT may carry: any but the trial role, which belongs to trial keys.
pub fn dashboard_role(role: Role) -> Option<Role> {
    (role != Role::Trial).then_some(role)
}

/// The caller an API key presented to KeyService is, given its verification's verdict.
pub fn api_key_caller(verdict: &Verdict) -> Result<Caller> {
    match verdict {
        // The usage limit meters VerifyKey; an exhausted key may still manage keys.
        Verdict::Valid(entry, _) | Verdict::UsageExhausted(entry) => {
            let key = entry
                .key()
                .ok_or(Error::Internal("a valid verdict without a key".to_owned()))?;
            Ok(Caller::ApiKey {
                key_id: key.key_id.as_str().to_owned(),
                prefix: key.prefix.clone(),
                name: key.name.as_str().to_owned(),
                workspace_id: key.workspace_id.clone(),
                role: key.role,
            })
        }
        Verdict::Revoked(_) => Err(Error::InvalidCredentials("the API key is revoked")),
        Verdict::Expired(_) => Err(Error::InvalidCredentials("the API key is expired")),
        Verdict::Disabled(_) => Err(Error::InvalidCredentials("the API key is disabled")),
        Verdict::Locked(_) => Err(Error::InvalidCredentials(
            "the API key or the caller's address is locked after too many failed verifications",
        )),
        _ => Err(Error::InvalidCredentials("unknown API key")),
    }
}

/// Where a request came from, as far as the transport can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The connection's peer address.
    pub peer: Option<ClientIp>,
    /// The caller presented an admin or verify token: a front end whose word on the end user's
    /// address is taken.
    pub trusted_front_end: bool,
}

impl Origin {
    /// The end user's address: `claimed` (a request's `client_ip`, empty when not given) from
    /// a trusted front end, otherwise the connection's peer. Anyone else's claim is ignored,
    /// unread: it cannot even be a bad request.
    pub fn end_user_ip(&self, claimed: &str) -> Result<ClientIp> {
        if !claimed.is_empty() && self.trusted_front_end {
            return ClientIp::parse(claimed)
                .ok_or_else(|| Error::invalid("client_ip", "must be an IPv4 or IPv6 address"));
        }
        self.peer
            .ok_or_else(|| Error::Internal("no peer address".to_owned()))
    }

    /// The end user's address as text for the audit trail, by the rule of `end_user_ip`:
    /// `claimed` from a trusted front end, otherwise `peer` (the connection's exact address).
    pub fn end_user_text<'a>(&self, claimed: &'a str, peer: &'a str) -> &'a str {
        if !claimed.is_empty() && self.trusted_front_end {
            claimed
        } else {
            peer
        }
    }
}

/// An authenticated caller of KeyService.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A platform admin token: any workspace, named in the request.
    Admin,
    /// A dashboard user, from a verified JWT.
    User {
        subject: String,
        workspace_id: WorkspaceId,
        role: Role,
    },
    /// An API key issued by this service, acting with its own role in its own workspace.
    ApiKey {
        key_id: String,
        prefix: String,
        name: String,
        workspace_id: WorkspaceId,
        role: Role,
    },
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Issue a key with this role.
    Issue {
        role: Role,
    },
    /// GetKey or ListKeys.
    Read,
    Revoke {
        key_id: &'a str,
    },
    /// RevokeKey with `revoke_successors`: revoking keys other than the one named, so the
    /// exemption that lets an API key revoke itself does not stretch to it. Otherwise a leaked
    /// key still in its grace period could revoke the successor its owner now uses.
    RevokeWithSuccessors,
    Rotate {
        key_id: &'a str,
    },
    /// UpdateKey; what the update may change is `check_update`'s to decide.
    Update {
        key_id: &'a str,
    },
    /// ListAuditEvents.
    ReadAudit,
    /// WatchKeyEvents over every workspace: admins only.
    ReadAllWorkspaces,
    /// CreateWebhook, ListWebhooks, DeleteWebhook, ListWebhookDeliveries,
    /// RedeliverWebhookEvent: a webhook sends the workspace's events out, so even reading them
    /// (their URLs) takes a developer.
    ManageWebhooks,
    /// ReportUsage: writes the counters billing and key reviews trust, so it takes a developer.
    ReportUsage,
}

impl Caller {
    /// The workspace a request acts in. Admins must name one; users and API keys act in their
    /// own, and may leave the field empty to mean it.
    pub fn workspace_for(&self, requested: &str) -> Result<WorkspaceId> {
        let own = match self {
            Self::Admin => {
                return WorkspaceId::parse(requested)
                    .map_err(|reason| Error::invalid("workspace_id", reason));
            }
            Self::User { workspace_id, .. } | Self::ApiKey { workspace_id, .. } => workspace_id,
        };
        if requested.is_empty() || requested == own.as_str() {
            return Ok(own.clone());
        }
        Err(Error::WorkspaceMismatch(requested.to_owned()))
    }

    /// What this caller may ask of a rotation beyond a new secret. Only callers that may issue
    /// keys may give a successor a new lifetime; an API key (rotating itself or another key)
    /// renews secrets only, with a short grace period, so a leaked key cannot outlive its owner's
    /// intent.
    pub fn rotation_rights(&self) -> RotationRights {
        match self {
            Self::Admin => RotationRights {
                may_set_expiry: true,
                grace_cap: None,
                role_ceiling: None,
            },
            Self::User { role, .. } => RotationRights {
                may_set_expiry: *role >= Role::Developer,
                grace_cap: None,
                role_ceiling: Some(*role),
            },
            Self::ApiKey { role, .. } => RotationRights {
                may_set_expiry: false,
                grace_cap: Some(API_KEY_MAX_ROTATION_GRACE),
                role_ceiling: Some(*role),
            },
        }
    }

    /// Refuses the action unless the caller's kind and role allow it.
    pub fn authorize(&self, action: Action<'_>) -> Result<()> {
        match (self, action) {
            (Self::Admin, _) => Ok(()),
            (_, Action::ReadAllWorkspaces) => Err(Error::InsufficientRole(
                "only an admin may watch every workspace".to_owned(),
            )),
            (
                Self::ApiKey {
                    role: Role::Trial, ..
                },
                _,
            ) => Err(Error::InsufficientRole(
                "trial keys cannot call KeyService".to_owned(),
            )),
            (Self::ApiKey { .. }, Action::Issue { .. }) => Err(Error::InsufficientRole(
                "API keys cannot issue keys".to_owned(),
            )),
            (Self::User { role, .. }, Action::Issue { role: wanted }) => {
                require(*role, Role::Developer, "issue keys")?;
                if wanted > *role {
                    return Err(Error::InsufficientRole(format!(
                        "a {} cannot grant the role {}",
                        role.as_str(),
                        wanted.as_str()
                    )));
                }
                Ok(())
            }
            (Self::User { .. } | Self::ApiKey { .. }, Action::Read | Action::ReadAudit) => Ok(()),
            (
                Self::ApiKey { key_id: own, .. },
                Action::Revoke { key_id } | Action::Rotate { key_id } | Action::Update { key_id },
            ) if own == key_id => Ok(()),
            (
                Self::User { role, .. } | Self::ApiKey { role, .. },
                Action::Revoke { .. } | Action::Rotate { .. } | Action::RevokeWithSuccessors,
            ) => require(*role, Role::Developer, "revoke or rotate keys"),
            (Self::User { role, .. } | Self::ApiKey { role, .. }, Action::Update { .. }) => {
                require(*role, Role::Developer, "update keys")
            }
            (Self::User { role, .. } | Self::ApiKey { role, .. }, Action::ManageWebhooks) => {
                require(*role, Role::Developer, "manage webhooks")
            }
            (Self::User { role, .. } | Self::ApiKey { role, .. }, Action::ReportUsage) => {
                require(*role, Role::Developer, "report usage")
            }
        }
    }

    /// How the caller is recorded in the audit trail and in `created_by` / `revoked_by`.
    pub fn actor(&self) -> Actor {
        match self {
            Self::Admin => Actor::admin(),
            Self::User {
                subject,
                workspace_id: _,
                role: _,
            } => Actor::new(format!("user:{subject}"), AuditActor::user(subject)),
            Self::ApiKey {
                key_id,
                prefix,
                name,
                ..
            } => Actor::new(
                format!("key:{prefix} ({name})"),
                AuditActor::api_key(key_id, prefix, name),
            ),
        }
    }

    /// The identity rate limits are counted against; admins are exempt (`None`).
    pub fn rate_limit_key(&self) -> Option<String> {
        match self {
            Self::Admin => None,
            Self::User {
                subject,
                workspace_id,
                ..
            } => Some(format!("user:{}:{subject}", workspace_id.as_str())),
            Self::ApiKey { key_id, .. } => Some(format!("key:{key_id}")),
        }
    }
}

/// Whether `caller` may turn the key `before` into `after` (UpdateKey), beyond being allowed to
/// update it at all (`Action::Update`). The rules of IssueKey and RotateKey hold: nobody gives
/// a role above their own or touches a key whose role is above their own, and only callers that
/// may issue keys may make a key live longer. A key updating itself may narrow itself (fewer
/// scopes, a lower role, an earlier expiry, disabled) but never widen itself.
pub fn check_update(caller: &Caller, before: &Key, after: &Key) -> Result<()> {
    let rights = caller.rotation_rights();
    if let Some(ceiling) = rights.role_ceiling {
        for role in [before.role, after.role] {
            if role > ceiling {
                return Err(Error::InsufficientRole(format!(
                    "a {} cannot update a key to or from the role {}",
                    ceiling.as_str(),
                    role.as_str()
                )));
            }
        }
    }
    if after.role != before.role && (before.role == Role::Trial || after.role == Role::Trial) {
        return Err(Error::invalid(
            "key.role",
            "trial keys keep the trial role, and no other key can take it",
        ));
    }
    if lives_longer(after.expire_time, before.expire_time) {
        if !rights.may_set_expiry {
            return Err(Error::InsufficientRole(
                "only a caller that may issue keys can make a key live longer".to_owned(),
            ));
        }
        if before.rotated_to_key_id.is_some() {
            return Err(Error::invalid(
                "key.expire_time",
                "a rotated key ends with its grace period and cannot live longer",
            ));
        }
    }
    let is_itself =
        matches!(caller, Caller::ApiKey { key_id, .. } if *key_id == before.key_id.as_str());
    if is_itself {
        if after.role > before.role {
            return Err(Error::InsufficientRole(
                "an API key cannot raise its own role".to_owned(),
            ));
        }
        if !after.scopes.within(&before.scopes) {
            return Err(Error::InsufficientRole(
                "an API key cannot widen its own scopes".to_owned(),
            ));
        }
    }
    Ok(())
}

/// True when an expiry of `after` ends later than `before` (never ending is the latest).
fn lives_longer(after: Option<UnixMicros>, before: Option<UnixMicros>) -> bool {
    match (after, before) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(after), Some(before)) => after > before,
    }
}

fn require(role: Role, needed: Role, what: &str) -> Result<()> {
    if role >= needed {
        return Ok(());
    }
    Err(Error::InsufficientRole(format!(
        "the role {} cannot {what}",
        role.as_str()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> WorkspaceId {
        WorkspaceId::parse("acme").unwrap()
    }

    fn user(role: Role) -> Caller {
        Caller::User {
            subject: "u1".into(),
            workspace_id: workspace(),
            role,
        }
    }

    fn api_key(role: Role) -> Caller {
        Caller::ApiKey {
            key_id: "SELFSELFSELF".into(),
            prefix: "ka_live_SELFSELFSELF".into(),
            name: "svc".into(),
            workspace_id: workspace(),
            role,
        }
    }

    #[test]
    fn role_matrix() {
        use Role::*;
        let other = "OTHEROTHEROT";
        // (caller, issue developer, read, revoke other, rotate other, revoke self)
        let table = [
            (Caller::Admin, true, true, true, true, true),
            (user(Viewer), false, true, false, false, false),
            (user(Developer), true, true, true, true, true),
            (user(AccountAdmin), true, true, true, true, true),
            (api_key(Viewer), false, true, false, false, true),
            (api_key(Developer), false, true, true, true, true),
            (api_key(AccountAdmin), false, true, true, true, true),
        ];
        for (caller, issue, read, revoke, rotate, revoke_self) in table {
            let check = |action| caller.authorize(action).is_ok();
            assert_eq!(
                check(Action::Issue { role: Developer }),
                issue,
                "{caller:?} issue"
            );
            assert_eq!(check(Action::Read), read, "{caller:?} read");
            assert_eq!(
                check(Action::Revoke { key_id: other }),
                revoke,
                "{caller:?} revoke"
            );
            assert_eq!(
                check(Action::Rotate { key_id: other }),
                rotate,
                "{caller:?} rotate"
            );
            let self_allowed = check(Action::Revoke {
                key_id: "SELFSELFSELF",
            }) && check(Action::Rotate {
                key_id: "SELFSELFSELF",
            });
            let expected_self = revoke_self || matches!(caller, Caller::ApiKey { .. });
            assert_eq!(self_allowed, expected_self, "{caller:?} self");
        }
    }

    #[test]
    fn reporting_usage_takes_a_developer() {
        use Role::*;
        for (caller, allowed) in [
            (Caller::Admin, true),
            (user(Viewer), false),
            (user(Developer), true),
            (user(AccountAdmin), true),
            (api_key(Viewer), false),
            (api_key(Developer), true),
            (api_key(AccountAdmin), true),
            (api_key(Trial), false),
        ] {
            assert_eq!(
                caller.authorize(Action::ReportUsage).is_ok(),
                allowed,
                "{caller:?}"
            );
        }
    }

    #[test]
    fn managing_webhooks_takes_a_developer() {
        use Role::*;
        for (caller, allowed) in [
            (Caller::Admin, true),
            (user(Viewer), false),
            (user(Developer), true),
            (user(AccountAdmin), true),
            (api_key(Viewer), false),
            (api_key(Developer), true),
            (api_key(Trial), false),
        ] {
            assert_eq!(
                caller.authorize(Action::ManageWebhooks).is_ok(),
                allowed,
                "{caller:?}"
            );
        }
    }

    #[test]
    fn revoking_successors_needs_the_right_to_revoke_other_keys() {
        use Role::*;
        for (caller, allowed) in [
            (Caller::Admin, true),
            (user(Viewer), false),
            (user(Developer), true),
            (api_key(Viewer), false),
            (api_key(Developer), true),
        ] {
            assert_eq!(
                caller.authorize(Action::RevokeWithSuccessors).is_ok(),
                allowed,
                "{caller:?}"
            );
        }
    }

    #[test]
    fn nobody_grants_above_their_role() {
        assert!(
            user(Role::Developer)
                .authorize(Action::Issue {
                    role: Role::AccountAdmin
                })
                .is_err()
        );
        assert!(
            user(Role::AccountAdmin)
                .authorize(Action::Issue {
                    role: Role::AccountAdmin
                })
                .is_ok()
        );
        assert!(
            Caller::Admin
                .authorize(Action::Issue {
                    role: Role::AccountAdmin
                })
                .is_ok()
        );
    }

    #[test]
    fn workspaces_are_sealed() {
        let caller = user(Role::AccountAdmin);
        assert_eq!(caller.workspace_for("").unwrap(), workspace());
        assert_eq!(caller.workspace_for("acme").unwrap(), workspace());
        assert!(matches!(
            caller.workspace_for("other"),
            Err(Error::WorkspaceMismatch(_))
        ));
        assert!(matches!(
            Caller::Admin.workspace_for(""),
            Err(Error::InvalidArgument { .. })
        ));
        assert_eq!(
            Caller::Admin.workspace_for("other").unwrap().as_str(),
            "other"
        );
    }

    #[test]
    fn issue_key_makes_no_trial_keys() {
        use Environment::{Dev, Live, Test};
        use Role::{AccountAdmin, Developer, Viewer};
        for (role, environment, allowed) in [
            (Developer, Live, true),
            (AccountAdmin, Test, true),
            (Viewer, Dev, true),
            (Role::Trial, Live, false),
            (Developer, Environment::Trial, false),
        ] {
            let checked = check_issuable(role, environment);
            assert_eq!(checked.is_ok(), allowed, "{role:?} {environment:?}");
            if let Err(error) = checked {
                assert!(
                    error
                        .to_string()
                        .contains("trial keys are issued by IssueTrialKey only"),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn dashboards_never_carry_the_trial_role() {
        assert_eq!(dashboard_role(Role::Trial), None);
        for role in [Role::Viewer, Role::Developer, Role::AccountAdmin] {
            assert_eq!(dashboard_role(role), Some(role));
        }
    }

    #[test]
    fn only_a_trusted_front_end_names_the_end_users_address() {
        let peer = ClientIp::parse("192.0.2.7");
        let origin = |trusted_front_end| Origin {
            peer,
            trusted_front_end,
        };
        let claimed = "198.51.100.1";
        assert_eq!(
            origin(true).end_user_ip(claimed).ok(),
            ClientIp::parse(claimed)
        );
        assert_eq!(origin(true).end_user_ip("").ok(), peer);
        // Anyone else's claim is ignored, even one that is not an address.
        assert_eq!(origin(false).end_user_ip(claimed).ok(), peer);
        assert_eq!(origin(false).end_user_ip("not an ip").ok(), peer);
        assert!(matches!(
            origin(true).end_user_ip("not an ip"),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn rotations_grant_nothing_above_the_caller() {
        use Role::*;
        for (caller, may_set_expiry, highest_rotatable) in [
            (Caller::Admin, true, AccountAdmin),
            (user(Viewer), false, Viewer),
            (user(Developer), true, Developer),
            (user(AccountAdmin), true, AccountAdmin),
            (api_key(Developer), false, Developer),
            (api_key(AccountAdmin), false, AccountAdmin),
        ] {
            let rights = caller.rotation_rights();
            assert_eq!(rights.permit_expiry().is_ok(), may_set_expiry, "{caller:?}");
            for role in [Viewer, Developer, AccountAdmin] {
                assert_eq!(
                    rights.permit_role(role).is_ok(),
                    role <= highest_rotatable,
                    "{caller:?} rotating {role:?}"
                );
            }
        }
        assert_eq!(
            api_key(Developer).rotation_rights().grace_cap,
            Some(API_KEY_MAX_ROTATION_GRACE)
        );
    }

    /// A key of the test workspace: `SELFSELFSELF` is the key `api_key` callers are.
    fn key(key_id: &str, role: Role, scopes: &[&str], expire_time: Option<UnixMicros>) -> Key {
        use crate::key::{KeyDescription, KeyId, KeyName, Metadata, Scopes};
        Key {
            key_id: KeyId::parse(key_id).unwrap(),
            workspace_id: workspace(),
            name: KeyName::parse("a key").unwrap(),
            description: KeyDescription::default(),
            prefix: format!("ka_live_{key_id}"),
            scopes: Scopes::parse(scopes).unwrap(),
            role,
            environment: Environment::Live,
            create_time: 0,
            expire_time,
            revoke_time: None,
            last_used_time: None,
            total_requests: 0,
            metadata: Metadata::default(),
            rotated_from_key_id: None,
            rotated_to_key_id: None,
            created_by: "admin".into(),
            revoked_by: None,
            usage_limit: 0,
            usage_remaining: 0,
            budget_id: None,
            enabled: true,
            version: 1,
            update_time: None,
        }
    }

    /// What `check_update` answers, by kind.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        Allowed,
        /// PERMISSION_DENIED, INSUFFICIENT_ROLE.
        Denied,
        /// INVALID_ARGUMENT naming `key.role` or `key.expire_time`.
        Invalid(&'static str),
    }

    fn outcome(result: Result<()>) -> Outcome {
        match result {
            Ok(()) => Outcome::Allowed,
            Err(Error::InsufficientRole(_)) => Outcome::Denied,
            Err(Error::InvalidArgument { field, .. }) => Outcome::Invalid(field),
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }

    #[test]
    fn check_update_table() {
        use Outcome::*;
        use Role::*;
        const SELF: &str = "SELFSELFSELF";
        const OTHER: &str = "OTHEROTHEROT";
        const DAY: UnixMicros = 86_400_000_000;
        let (soon, later) = (Some(10 * DAY), Some(20 * DAY));
        let base = |role, scopes: &[&str], expiry| key(OTHER, role, scopes, expiry);
        let own = |role, scopes: &[&str], expiry| key(SELF, role, scopes, expiry);
        let rotated = |expiry| Key {
            rotated_to_key_id: crate::key::KeyId::parse("NEXTNEXTNEXT"),
            ..base(Developer, &[], expiry)
        };
        let disabled = |key: Key| Key {
            enabled: false,
            ..key
        };
        let renamed = |key: Key| Key {
            name: crate::key::KeyName::parse("renamed").unwrap(),
            ..key
        };
        // (what, caller, before, after, outcome)
        #[rustfmt::skip]
        let table = [
            // Roles: nobody gives or touches a role above their own.
            ("admin grants account_admin", Caller::Admin, base(Developer, &[], None), base(AccountAdmin, &[], None), Allowed),
            ("account_admin grants account_admin", user(AccountAdmin), base(Developer, &[], None), base(AccountAdmin, &[], None), Allowed),
            ("developer grants account_admin", user(Developer), base(Developer, &[], None), base(AccountAdmin, &[], None), Denied),
            ("developer lowers an account_admin", user(Developer), base(AccountAdmin, &[], None), base(Viewer, &[], None), Denied),
            ("developer renames an account_admin", user(Developer), base(AccountAdmin, &[], None), renamed(base(AccountAdmin, &[], None)), Denied),
            ("developer disables an account_admin", user(Developer), base(AccountAdmin, &[], None), disabled(base(AccountAdmin, &[], None)), Denied),
            ("developer lowers a developer", user(Developer), base(Developer, &[], None), base(Viewer, &[], None), Allowed),
            ("developer raises a viewer to developer", user(Developer), base(Viewer, &[], None), base(Developer, &[], None), Allowed),
            ("developer key grants account_admin", api_key(Developer), base(Developer, &[], None), base(AccountAdmin, &[], None), Denied),
            ("developer key disables a developer", api_key(Developer), base(Developer, &[], None), disabled(base(Developer, &[], None)), Allowed),
            // The trial role is neither given nor taken away, even by an admin.
            ("admin gives the trial role", Caller::Admin, base(Viewer, &[], None), base(Trial, &[], None), Invalid("key.role")),
            ("admin takes the trial role", Caller::Admin, base(Trial, &[], soon), base(Viewer, &[], soon), Invalid("key.role")),
            ("a key lowers itself to trial", api_key(Viewer), own(Viewer, &[], None), own(Trial, &[], None), Invalid("key.role")),
            ("admin renames a trial key", Caller::Admin, base(Trial, &[], soon), renamed(base(Trial, &[], soon)), Allowed),
            // Lifetimes: only callers that may issue keys make a key live longer.
            ("admin extends", Caller::Admin, base(Developer, &[], soon), base(Developer, &[], later), Allowed),
            ("admin removes an expiry", Caller::Admin, base(Developer, &[], soon), base(Developer, &[], None), Allowed),
            ("developer extends", user(Developer), base(Developer, &[], soon), base(Developer, &[], later), Allowed),
            ("developer key extends another key", api_key(Developer), base(Developer, &[], soon), base(Developer, &[], later), Denied),
            ("developer key removes another key's expiry", api_key(Developer), base(Developer, &[], soon), base(Developer, &[], None), Denied),
            ("developer key shortens another key", api_key(Developer), base(Developer, &[], later), base(Developer, &[], soon), Allowed),
            ("developer key gives an unending key an expiry", api_key(Developer), base(Developer, &[], None), base(Developer, &[], soon), Allowed),
            ("admin extends a rotated key", Caller::Admin, rotated(soon), rotated(later), Invalid("key.expire_time")),
            ("admin removes a rotated key's expiry", Caller::Admin, rotated(soon), rotated(None), Invalid("key.expire_time")),
            ("admin shortens a rotated key", Caller::Admin, rotated(later), rotated(soon), Allowed),
            // A key on itself: narrower, never wider.
            ("a key narrows its scopes", api_key(Developer), own(Developer, &["read", "write"], None), own(Developer, &["read"], None), Allowed),
            ("a key keeps its scopes", api_key(Developer), own(Developer, &["read"], None), renamed(own(Developer, &["read"], None)), Allowed),
            ("a full-access key narrows to a scope", api_key(Developer), own(Developer, &[], None), own(Developer, &["read"], None), Allowed),
            ("a key widens its scopes", api_key(Developer), own(Developer, &["read"], None), own(Developer, &["read", "write"], None), Denied),
            ("a key swaps its scopes", api_key(Developer), own(Developer, &["read"], None), own(Developer, &["write"], None), Denied),
            ("a key widens to full access", api_key(Developer), own(Developer, &["read"], None), own(Developer, &[], None), Denied),
            ("a key widens to full_access", api_key(Developer), own(Developer, &["read"], None), own(Developer, &["full_access"], None), Denied),
            ("a key lowers its role", api_key(Developer), own(Developer, &[], None), own(Viewer, &[], None), Allowed),
            ("a viewer key raises its role", api_key(Viewer), own(Viewer, &[], None), own(Developer, &[], None), Denied),
            ("a key shortens itself", api_key(Viewer), own(Viewer, &[], later), own(Viewer, &[], soon), Allowed),
            ("a key extends itself", api_key(AccountAdmin), own(AccountAdmin, &[], soon), own(AccountAdmin, &[], later), Denied),
            ("a key removes its expiry", api_key(AccountAdmin), own(AccountAdmin, &[], soon), own(AccountAdmin, &[], None), Denied),
            ("a key disables itself", api_key(Viewer), own(Viewer, &["read"], soon), disabled(own(Viewer, &["read"], soon)), Allowed),
            // Widening another key is not widening itself (the table in the header).
            ("developer key widens another key's scopes", api_key(Developer), base(Developer, &["read"], None), base(Developer, &[], None), Allowed),
        ];
        for (what, caller, before, after, expected) in table {
            assert_eq!(
                outcome(check_update(&caller, &before, &after)),
                expected,
                "{what}"
            );
        }
    }
}
