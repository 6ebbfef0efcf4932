//! What each caller may do: the role matrix and workspace sealing, as pure functions.
//!
//! | | admin | viewer | developer | account_admin | API key |
//! |---|---|---|---|---|---|
//! | IssueKey | yes | no | yes | yes | never |
//! | GetKey, ListKeys | yes | yes | yes | yes | viewer and up |
//! | RevokeKey, RotateKey | yes | no | yes | yes | developer and up, or itself |
//! | RevokeKey with revoke_successors | yes | no | yes | yes | developer and up |
//! | RotateKey: set the successor's expiry | yes | no | yes | yes | never |
//! | RotateKey: longest grace period | server cap | - | server cap | server cap | 24 h |
//!
//! Nobody grants a role above their own.

use crate::error::{Error, Result};
use crate::key::{Role, WorkspaceId};
use crate::keys::{API_KEY_MAX_ROTATION_GRACE, Actor, RotationRights};

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
            (Self::User { .. } | Self::ApiKey { .. }, Action::Read) => Ok(()),
            (
                Self::ApiKey { key_id: own, .. },
                Action::Revoke { key_id } | Action::Rotate { key_id },
            ) if own == key_id => Ok(()),
            (
                Self::User { role, .. } | Self::ApiKey { role, .. },
                Action::Revoke { .. } | Action::Rotate { .. } | Action::RevokeWithSuccessors,
            ) => require(*role, Role::Developer, "revoke or rotate keys"),
        }
    }

    /// How the caller is recorded in the audit trail and in `created_by` / `revoked_by`.
    pub fn actor(&self) -> Actor {
        match self {
            Self::Admin => Actor::new("admin".to_owned()),
            Self::User {
                subject,
                workspace_id: _,
                role: _,
            } => Actor::new(format!("user:{subject}")),
            Self::ApiKey { prefix, name, .. } => Actor::new(format!("key:{prefix} ({name})")),
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
}
