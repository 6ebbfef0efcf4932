//! The gateway file (`--gateway-config`, TOML): what each route of the protected API requires
//! (scopes, a minimum role, a cost), which header carries a key besides `Authorization`, and the
//! names of the identity headers the upstream receives. README.md, "Gateways", documents it.
//!
//! A request's path is matched as the upstream could read it. A path can be written several ways
//! (`/a/./b`, `/a//b`, `/a/%62`, `/a%2Fb`, `/a\b`, `/a;x=1/b` for servers that drop path
//! parameters, `/a.json` for frameworks that strip a format suffix, `/A` for case-insensitive
//! ones); each plausible reading is normalised and matched, and when they pick different routes
//! the request must satisfy all of them. A spelling can therefore never reach a route with weaker
//! requirements than the one the upstream serves.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::Deserialize;

use crate::key::{Role, Scopes};

/// The most routes a file may hold: the matching is linear, and a gateway file is written by hand.
const MAX_ROUTES: usize = 1024;

/// The longest request path considered; anything longer is matched by its first this many bytes
/// (proxies cap request lines far below this anyway).
const MAX_PATH_LEN: usize = 8 * 1024;

/// What one request must satisfy, beyond being a valid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub scopes: Vec<String>,
    pub minimum_role: Option<Role>,
    /// Uses of a usage-limited key the request consumes.
    pub cost: i64,
}

impl Default for Requirement {
    /// Any valid key, one use.
    fn default() -> Self {
        Self {
            scopes: Vec::new(),
            minimum_role: None,
            cost: 1,
        }
    }
}

impl Requirement {
    /// Both requirements at once: every scope, the higher role, the higher cost.
    pub fn and(mut self, other: &Requirement) -> Self {
        for scope in &other.scopes {
            if !self.scopes.contains(scope) {
                self.scopes.push(scope.clone());
            }
        }
        self.minimum_role = self.minimum_role.max(other.minimum_role);
        self.cost = self.cost.max(other.cost);
        self
    }
}

/// Names of the headers that carry the verified key's identity to the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub key_id: String,
    pub workspace: String,
    pub role: String,
    pub environment: String,
    pub scopes: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        Self {
            key_id: "x-key-id".into(),
            workspace: "x-key-workspace".into(),
            role: "x-key-role".into(),
            environment: "x-key-environment".into(),
            scopes: "x-key-scopes".into(),
        }
    }
}

impl IdentityHeaders {
    pub fn names(&self) -> [&str; 5] {
        [
            &self.key_id,
            &self.workspace,
            &self.role,
            &self.environment,
            &self.scopes,
        ]
    }
}

/// Where a key may come from, and whether it is taken off the request before the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyHeaders {
    /// A header that carries the bare key, read when `Authorization` carries none.
    pub header: String,
    /// Remove `Authorization` and `header` from the request before the upstream (ext_authz; the
    /// proxies' own configuration does it for forward auth), so the key never reaches it.
    pub strip: bool,
}

impl Default for KeyHeaders {
    fn default() -> Self {
        Self {
            header: "x-api-key".into(),
            strip: true,
        }
    }
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: KeyHeaders,
    #[serde(default)]
    identity_headers: IdentityHeaders,
    #[serde(default, rename = "route")]
    routes: Vec<RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    prefix: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    minimum_role: Option<String>,
    cost: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    /// Normalised: starts with `/`, no trailing `/` unless it is the root.
    prefix: String,
    /// `prefix` in lower case, for the case-insensitive reading.
    folded_prefix: String,
    /// Upper case; empty: every method.
    methods: Vec<String>,
    requirement: Requirement,
}

impl Route {
    fn matches(&self, method: &str, reading: &Reading<'_>) -> bool {
        let method_matches =
            self.methods.is_empty() || self.methods.iter().any(|known| known == method);
        let prefix = if reading.folded {
            &self.folded_prefix
        } else {
            &self.prefix
        };
        method_matches && under_prefix(&reading.path, prefix)
    }
}

/// `path` is `prefix` or below it, segment by segment: `/v1/billing` covers `/v1/billing` and
/// `/v1/billing/x`, not `/v1/billingx`.
fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The gateway file, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayRoutes {
    pub key: KeyHeaders,
    pub identity_headers: IdentityHeaders,
    routes: Vec<Route>,
}

impl GatewayRoutes {
    /// Parses and checks a gateway file; the error names what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|error| error.to_string())?;
        if file.routes.len() > MAX_ROUTES {
            return Err(format!("at most {MAX_ROUTES} routes are allowed"));
        }
        check_header_name("key.header", &file.key.header)?;
        let identity = &file.identity_headers;
        for (field, name) in [
            ("key_id", &identity.key_id),
            ("workspace", &identity.workspace),
            ("role", &identity.role),
            ("environment", &identity.environment),
            ("scopes", &identity.scopes),
        ] {
            check_header_name(&format!("identity_headers.{field}"), name)?;
        }
        let routes = file
            .routes
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                route(entry).map_err(|reason| format!("route {} : {reason}", index + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            key: KeyHeaders {
                header: file.key.header.to_ascii_lowercase(),
                ..file.key
            },
            identity_headers: IdentityHeaders {
                key_id: identity.key_id.to_ascii_lowercase(),
                workspace: identity.workspace.to_ascii_lowercase(),
                role: identity.role.to_ascii_lowercase(),
                environment: identity.environment.to_ascii_lowercase(),
                scopes: identity.scopes.to_ascii_lowercase(),
            },
            routes,
        })
    }

    /// What a request for `path` (a request target: path, query and all) with `method` must
    /// satisfy: the most specific route for every reading of the path, all together. No route:
    /// any valid key.
    pub fn requirement(&self, method: &str, target: &str) -> Requirement {
        self.strictest(&[method], &[target])
    }

    /// Whether any route is configured (without one, every request needs just a valid key).
    pub fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// What a request must satisfy when it may be any of `methods` × `targets` (a proxy and a
    /// client may both have named it): the most specific route of every method and every
    /// reading of every target, all together. Each target is read once, whatever the methods.
    pub fn strictest(&self, methods: &[&str], targets: &[&str]) -> Requirement {
        if self.routes.is_empty() {
            return Requirement::default();
        }
        let methods: Vec<String> = methods
            .iter()
            .map(|method| method.trim().to_ascii_uppercase())
            .collect();
        let mut chosen: Vec<&Route> = Vec::with_capacity(2);
        for target in targets {
            for reading in readings(target) {
                for method in &methods {
                    if let Some(route) = self.most_specific(method, &reading)
                        && !chosen.contains(&route)
                    {
                        chosen.push(route);
                    }
                }
            }
        }
        chosen
            .into_iter()
            .fold(None, |all: Option<Requirement>, route| {
                Some(match all {
                    None => route.requirement.clone(),
                    Some(all) => all.and(&route.requirement),
                })
            })
            .unwrap_or_default()
    }

    /// The longest matching prefix; at equal length a route naming the method wins.
    fn most_specific(&self, method: &str, reading: &Reading<'_>) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|route| route.matches(method, reading))
            .max_by_key(|route| (route.prefix.len(), !route.methods.is_empty()))
    }
}

fn route(entry: RouteEntry) -> Result<Route, String> {
    if !entry.prefix.starts_with('/') {
        return Err(format!("prefix {:?} must start with /", entry.prefix));
    }
    // Written prefixes are normalised like paths, so `/v1/billing/` and `/v1/billing` are one.
    let prefix = normalise(&entry.prefix, Decoding::Segments, Parameters::Keep);
    let mut methods = Vec::with_capacity(entry.methods.len());
    for method in entry.methods {
        let valid = !method.is_empty()
            && method.len() <= 32
            && method.bytes().all(|byte| byte.is_ascii_alphabetic());
        if !valid {
            return Err(format!("method {method:?} is not an HTTP method"));
        }
        methods.push(method.to_ascii_uppercase());
    }
    Scopes::check_required(&entry.scopes).map_err(|reason| format!("scopes: {reason}"))?;
    let minimum_role = entry
        .minimum_role
        .as_deref()
        .map(|name| {
            Role::from_db(name).ok_or_else(|| {
                format!(
                    "minimum_role {name:?} is not one of trial, viewer, developer, account_admin"
                )
            })
        })
        .transpose()?;
    let cost = entry.cost.unwrap_or(1);
    if cost < 0 {
        return Err("cost must not be negative".to_owned());
    }
    Ok(Route {
        folded_prefix: prefix.to_lowercase(),
        prefix,
        methods,
        requirement: Requirement {
            scopes: entry.scopes,
            minimum_role,
            cost,
        },
    })
}

fn check_header_name(field: &str, name: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("{field}: {name:?} is not a valid header name"))
}

/// How much of a path's percent-encoding a reading decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoding {
    /// Everything but an encoded `/` (which stays inside its segment), as most servers route.
    Segments,
    /// Everything, with `\` as a separator too, as some frameworks and Windows servers read it.
    Everything,
}

/// Whether a reading drops `;` path parameters from each segment, as Tomcat and Jetty do before
/// routing (`/a;jsessionid=1/b` is `/a/b` to them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parameters {
    Keep,
    Drop,
}

/// One way the upstream could read a path: normalised, and matched against the routes either
/// as it is or, `folded`, in lower case against lower-cased prefixes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Reading<'a> {
    path: Cow<'a, str>,
    folded: bool,
}

/// The distinct readings of a request target.
fn readings(target: &str) -> BTreeSet<Reading<'_>> {
    let path = request_path(target);
    let mut paths: BTreeSet<Cow<'_, str>> = if is_plain(path) {
        // Already normalised, and every decoding of it is itself: no copy.
        BTreeSet::from([Cow::Borrowed(path)])
    } else {
        [Decoding::Segments, Decoding::Everything]
            .into_iter()
            .flat_map(|decoding| {
                [Parameters::Keep, Parameters::Drop]
                    .map(|parameters| Cow::Owned(normalise(path, decoding, parameters)))
            })
            .collect()
    };
    let unsuffixed: Vec<Cow<'_, str>> = paths
        .iter()
        .filter_map(|path| without_format_suffix(path))
        .map(|path| Cow::Owned(path.to_owned()))
        .collect();
    paths.extend(unsuffixed);
    let mut readings = BTreeSet::new();
    for path in paths {
        // Case-insensitive upstreams: the path in lower case against lower-cased prefixes.
        let folded = if path.bytes().any(|byte| byte.is_ascii_uppercase()) || !path.is_ascii() {
            Cow::Owned(path.to_lowercase())
        } else {
            path.clone()
        };
        readings.insert(Reading {
            path: folded,
            folded: true,
        });
        readings.insert(Reading {
            path,
            folded: false,
        });
    }
    readings
}

/// The path without a format suffix on its last segment (`/v1/admin.json` → `/v1/admin`), which
/// Rails and other frameworks route like the bare path; None when there is none.
fn without_format_suffix(path: &str) -> Option<&str> {
    let last = path.rfind('/')?;
    let dot = path.rfind('.').filter(|dot| *dot > last + 1)?;
    let suffix = &path[dot + 1..];
    let is_suffix =
        (1..=8).contains(&suffix.len()) && suffix.bytes().all(|byte| byte.is_ascii_alphanumeric());
    is_suffix.then(|| &path[..dot])
}

/// A path that every decoding leaves as it is: rooted, with no escapes, backslashes, path
/// parameters, empty or dot segments, and no trailing slash (but the root's).
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains(['%', '\\', ';'])
        && !path.contains("//")
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

/// The path of a request target: no scheme and authority, no query, no fragment.
fn request_path(target: &str) -> &str {
    let target = target.trim();
    let target = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            target
                .get(..scheme.len())
                .filter(|start| start.eq_ignore_ascii_case(scheme))
                .map(|_| &target[scheme.len()..])
        })
        .map_or(target, |rest| rest.find('/').map_or("/", |at| &rest[at..]));
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let path = &target[..end];
    match path.char_indices().nth(MAX_PATH_LEN) {
        Some((at, _)) => &path[..at],
        None => path,
    }
}

/// One reading of a path: percent-decoded as `decoding` says, path parameters dropped or kept,
/// empty and `.` segments dropped, `..` taking off the previous segment (never above the root).
fn normalise(path: &str, decoding: Decoding, parameters: Parameters) -> String {
    let decoded = percent_decode(path, decoding);
    let separators: &[char] = match decoding {
        Decoding::Segments => &['/'],
        Decoding::Everything => &['/', '\\'],
    };
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(separators) {
        let segment = match parameters {
            Parameters::Keep => segment,
            Parameters::Drop => segment.split(';').next().unwrap_or_default(),
        };
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut normalised = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        normalised.push('/');
        normalised.push_str(segment);
    }
    if normalised.is_empty() {
        normalised.push('/');
    }
    normalised
}

/// Decodes `%XX` escapes (lossily where the bytes are not UTF-8); a `%` not followed by two hex
/// digits stays as it is. With `Decoding::Segments`, `%2F` stays encoded.
fn percent_decode(path: &str, decoding: Decoding) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(b'/') if decoding == Decoding::Segments => {
                decoded.extend_from_slice(&bytes[index..index + 3]);
                index += 3;
            }
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [key]
        header = "X-Api-Key"

        [[route]]
        prefix = "/v1/billing/"
        scopes = ["billing:read"]

        [[route]]
        prefix = "/v1/billing"
        methods = ["post", "DELETE"]
        scopes = ["billing:write"]
        minimum_role = "developer"
        cost = 5

        [[route]]
        prefix = "/v1/admin"
        minimum_role = "account_admin"

        [[route]]
        prefix = "/v1/public"
        cost = 0
    "#;

    fn routes() -> GatewayRoutes {
        GatewayRoutes::parse(FILE).unwrap()
    }

    fn scopes(requirement: &Requirement) -> Vec<&str> {
        requirement.scopes.iter().map(String::as_str).collect()
    }

    #[test]
    fn the_most_specific_route_decides() {
        let routes = routes();
        let read = routes.requirement("GET", "/v1/billing/invoices?limit=5");
        assert_eq!(scopes(&read), ["billing:read"]);
        assert_eq!(read.minimum_role, None);
        assert_eq!(read.cost, 1);
        let write = routes.requirement("post", "/v1/billing");
        assert_eq!(scopes(&write), ["billing:write"]);
        assert_eq!(write.minimum_role, Some(Role::Developer));
        assert_eq!(write.cost, 5);
        assert_eq!(
            routes.requirement("GET", "/v1/admin/users").minimum_role,
            Some(Role::AccountAdmin)
        );
        // Segments, not characters: `/v1/billingx` is not under `/v1/billing`.
        assert_eq!(
            routes.requirement("POST", "/v1/billingx"),
            Requirement::default()
        );
        assert_eq!(routes.requirement("GET", "/"), Requirement::default());
        assert_eq!(routes.requirement("GET", "/v1/public/x").cost, 0);
        assert_eq!(routes.key.header, "x-api-key");
    }

    #[test]
    fn every_spelling_of_a_path_meets_its_routes_requirements() {
        let routes = routes();
        for target in [
            "/v1/admin",
            "/v1//admin",
            "/v1/./admin/",
            "/v1/public/../admin",
            "/v1/%61dmin",
            "/v1/%2561dmin/../../v1/admin",
            "/v1/public/..%2Fadmin",
            "/v1/public%2F..%2F..%2Fv1%2Fadmin",
            "/v1/public/..\\admin",
            "/../../v1/admin",
            "http://example.com/v1/admin?x=/v1/public",
            "HTTPS://example.com/v1/admin#frag",
            "/v1/admin/%zz",
            // Tomcat and Jetty drop path parameters before routing.
            "/v1/admin;x=1/users",
            "/v1/admin;/users",
            "/v1/public;/../admin",
            // Rails routes a format suffix like the bare path.
            "/v1/admin.json",
            // Case-insensitive servers.
            "/V1/Admin/users",
            "/v1/ADMIN",
        ] {
            assert_eq!(
                routes.requirement("GET", target).minimum_role,
                Some(Role::AccountAdmin),
                "{target}"
            );
        }
        // Readings that disagree are both enforced.
        let both = routes.requirement("POST", "/v1/billing/x%2F..%2F..%2Fadmin");
        assert_eq!(both.minimum_role, Some(Role::AccountAdmin));
        assert_eq!(scopes(&both), ["billing:write"]);
        assert_eq!(both.cost, 5);
    }

    #[test]
    fn plain_paths_are_their_own_reading() {
        for path in ["/", "/v1/billing", "/a.b/c-d/e_f", "/v1/.well-known"] {
            assert!(is_plain(path), "{path}");
            for parameters in [Parameters::Keep, Parameters::Drop] {
                assert_eq!(normalise(path, Decoding::Segments, parameters), path);
                assert_eq!(normalise(path, Decoding::Everything, parameters), path);
            }
        }
        for path in [
            "", "a", "/a/", "//a", "/a/./b", "/a/..", "/%61", "/a\\b", "/a;b",
        ] {
            assert!(!is_plain(path), "{path}");
        }
    }

    #[test]
    fn several_names_for_one_request_meet_every_requirement() {
        let routes = routes();
        let all = routes.strictest(&["GET", "POST"], &["/v1/public/x", "/v1/billing"]);
        assert_eq!(scopes(&all), ["billing:read", "billing:write"]);
        assert_eq!(all.minimum_role, Some(Role::Developer));
        assert_eq!(all.cost, 5);
        assert_eq!(routes.strictest(&["GET"], &["/v1/public"]).cost, 0);
    }

    #[test]
    fn odd_paths_never_panic() {
        let routes = routes();
        for target in [
            "", "%", "%%%", "%e9", "é/../..", "?", "#", "http://", "\\\\", "/%2",
        ] {
            let _ = routes.requirement("GET", target);
        }
        let long = "/a".repeat(100_000);
        assert_eq!(routes.requirement("GET", &long), Requirement::default());
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        for (file, expected) in [
            ("[[route]]\nprefix = \"v1\"", "must start with /"),
            (
                "[[route]]\nprefix = \"/\"\nminimum_role = \"owner\"",
                "minimum_role \"owner\"",
            ),
            ("[[route]]\nprefix = \"/\"\nscopes = [\"a b\"]", "scopes"),
            (
                "[[route]]\nprefix = \"/\"\nmethods = [\"GE T\"]",
                "not an HTTP method",
            ),
            ("[[route]]\nprefix = \"/\"\ncost = -1", "cost"),
            ("[[route]]\nprefix = \"/\"\nscope = []", "unknown field"),
            ("[key]\nheader = \"x api key\"", "key.header"),
            (
                "[identity_headers]\nkey_id = \"\"",
                "identity_headers.key_id",
            ),
        ] {
            let error = GatewayRoutes::parse(file).unwrap_err();
            assert!(error.contains(expected), "{file:?}: {error}");
        }
        assert_eq!(GatewayRoutes::parse("").unwrap(), GatewayRoutes::default());
    }
}
