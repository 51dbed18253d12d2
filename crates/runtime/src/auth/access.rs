//! Who may call what: each service declares, next to its RPCs, the roles that may call each
//! one (`ACCESS` in its `grpc.rs`); [`Role::Admin`] may call everything. A test in each service
//! crate walks the descriptor set ([`uncovered`]) so an RPC cannot ship without a rule.

use prost::Message as _;

use super::{Identity, Role};

/// One RPC's rule: its method name (as in the proto) and the roles that may call it.
pub type AccessRule = (&'static str, &'static [Role]);

/// Whether `identity` may call `method` under `rules`; the missing permission otherwise.
///
/// # Errors
/// `"<method> needs role a or b"`, or that no rule exists (never allowed).
pub fn allowed(rules: &[AccessRule], method: &str, identity: &Identity) -> Result<(), String> {
    if identity.roles.contains(&Role::Admin) {
        return Ok(());
    }
    let Some((_, roles)) = rules.iter().find(|(m, _)| *m == method) else {
        return Err(format!(
            "{method} has no access rule: only admin may call it"
        ));
    };
    allowed_roles(roles, method, identity)
}

/// Whether `identity` holds one of `roles` (or admin); the missing permission otherwise.
///
/// # Errors
/// `"<method> needs role a or b"`.
pub fn allowed_roles(roles: &[Role], method: &str, identity: &Identity) -> Result<(), String> {
    if identity.roles.contains(&Role::Admin) {
        return Ok(());
    }
    if roles.iter().any(|r| identity.roles.contains(r)) {
        return Ok(());
    }
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    Err(format!(
        "{method} needs role {} (or admin)",
        names.join(" or ")
    ))
}

/// Panics naming the RPCs of `service` without a rule in `rules`, and the rules naming no RPC
/// (each service's test that no RPC ships without a rule).
#[track_caller]
pub fn assert_covered(service: &str, rules: &[AccessRule]) {
    let (missing, stray) = uncovered(agentmesh_proto::FILE_DESCRIPTOR_SET, service, rules);
    assert!(
        missing.is_empty(),
        "RPCs without an access rule: {missing:?}"
    );
    assert!(stray.is_empty(), "rules naming no RPC: {stray:?}");
}

/// Role overrides from a roles file (`--auth-roles-file`): TOML mapping
/// `"<package.Service>/<Method>"` to a list of role names, e.g.
/// `"agentmesh.ratelimit.v1.RateLimiter/Reset" = ["operator", "service"]`. Every key must name
/// an RPC of `known` (each served service's rules), so a typo cannot silently do nothing.
///
/// # Errors
/// One line naming the key or role that is wrong.
pub fn parse_overrides(
    text: &str,
    known: &[(String, &'static [AccessRule])],
) -> Result<Vec<(String, Vec<Role>)>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let (service, method) = key
            .split_once('/')
            .ok_or_else(|| format!("{key:?}: write \"<package.Service>/<Method>\""))?;
        let exists = known
            .iter()
            .any(|(s, rules)| s == service && rules.iter().any(|(m, _)| *m == method));
        if !exists {
            return Err(format!("{key:?}: no such RPC is served here"));
        }
        let names = value
            .as_array()
            .ok_or_else(|| format!("{key:?}: give a list of roles, e.g. [\"operator\"]"))?;
        let mut roles = Vec::new();
        for name in names {
            let role = name.as_str().and_then(Role::parse).ok_or_else(|| {
                format!("{key:?}: {name} is not agent, service, operator or admin")
            })?;
            roles.push(role);
        }
        out.push((key, roles));
    }
    Ok(out)
}

/// The methods of `service` (fully qualified, e.g. `agentmesh.cache.v1.CacheCoordinator`) in
/// the encoded descriptor set that have no rule, and the rules that name no method.
#[must_use]
pub fn uncovered(
    descriptor_set: &[u8],
    service: &str,
    rules: &[AccessRule],
) -> (Vec<String>, Vec<String>) {
    let Ok(set) = prost_types::FileDescriptorSet::decode(descriptor_set) else {
        return (
            vec![format!("cannot decode the descriptor set for {service}")],
            Vec::new(),
        );
    };
    let methods: Vec<String> = set
        .file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service
                .iter()
                .filter(move |s| format!("{package}.{}", s.name()) == service)
                .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let missing = methods
        .iter()
        .filter(|m| !rules.iter().any(|(r, _)| r == m))
        .cloned()
        .collect();
    let stray = rules
        .iter()
        .filter(|(r, _)| !methods.iter().any(|m| m == r))
        .map(|(r, _)| (*r).to_owned())
        .collect();
    (missing, stray)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &[AccessRule] = &[
        ("Get", &[Role::Service, Role::Agent]),
        ("Warm", &[Role::Operator]),
    ];

    fn with(roles: &[Role]) -> Identity {
        Identity {
            subject: "s".into(),
            tenant: None,
            roles: roles.iter().copied().collect(),
            agent_id: None,
            expires_at: 0,
        }
    }

    #[test]
    fn test_roles_allow_their_methods_and_name_the_missing_role() {
        assert!(allowed(RULES, "Get", &with(&[Role::Agent])).is_ok());
        let e = allowed(RULES, "Warm", &with(&[Role::Service])).unwrap_err();
        assert_eq!(e, "Warm needs role operator (or admin)");
        assert!(allowed(RULES, "Warm", &with(&[Role::Admin])).is_ok());
        assert!(
            allowed(RULES, "Nope", &with(&[Role::Operator]))
                .unwrap_err()
                .contains("no access rule")
        );
    }

    #[test]
    fn test_a_roles_file_overrides_known_rpcs_and_names_mistakes() {
        let known = vec![("agentmesh.cache.v1.CacheCoordinator".to_owned(), RULES)];
        let parsed = parse_overrides(
            "\"agentmesh.cache.v1.CacheCoordinator/Warm\" = [\"service\", \"Operator\"]",
            &known,
        )
        .unwrap();
        assert_eq!(
            parsed,
            [(
                "agentmesh.cache.v1.CacheCoordinator/Warm".to_owned(),
                vec![Role::Service, Role::Operator]
            )]
        );
        for (text, says) in [
            (
                "\"agentmesh.cache.v1.CacheCoordinator/Nope\" = [\"service\"]",
                "no such RPC",
            ),
            ("\"Warm\" = [\"service\"]", "<package.Service>/<Method>"),
            (
                "\"agentmesh.cache.v1.CacheCoordinator/Warm\" = [\"root\"]",
                "not agent, service",
            ),
            ("x = ", "not TOML"),
        ] {
            let e = parse_overrides(text, &known).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn test_uncovered_lists_methods_without_rules_and_stray_rules() {
        let (missing, stray) = uncovered(
            agentmesh_proto::FILE_DESCRIPTOR_SET,
            "grpc.health.v1.Health",
            &[("Check", &[Role::Service]), ("Bogus", &[Role::Service])],
        );
        assert_eq!(missing, ["List", "Watch"]);
        assert_eq!(stray, ["Bogus"]);
    }
}
