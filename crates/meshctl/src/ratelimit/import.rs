//! `meshctl ratelimit import FILE`: turns an envoyproxy/ratelimit config file into agentmesh
//! policies, one per descriptor path with a `rate_limit`, and stores them with `PutPolicy`.
//!
//! Each policy is named `descriptor_policy_name(path)` in the file's domain, which is what the
//! Envoy RLS adapter looks up, and is a fixed window of `requests_per_unit` per `unit`
//! (MONTH = 30 days, YEAR = 365 days, as envoyproxy/ratelimit counts them).

use std::path::PathBuf;
use std::process::ExitCode;

use agentmesh_proto::ratelimit::v1 as pb;
use agentmesh_ratelimit::envoy::{MAX_DESCRIPTOR_ENTRIES, descriptor_policy_name, unit_period};
use agentmesh_ratelimit::spec::{
    MAX_NAMESPACE_LEN, MAX_POLICIES, MAX_POLICY_FILE_BYTES, MAX_POLICY_NAME_LEN,
};
use anyhow::{Context, bail};
use serde::Deserialize;

use super::proto_duration;
use crate::Output;

#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// envoyproxy/ratelimit config file (YAML: domain, descriptors).
    file: PathBuf,
    /// Rate limiter address.
    #[arg(
        long,
        env = "AGENTMESH_RATELIMIT_ADDR",
        default_value = "127.0.0.1:7104"
    )]
    addr: String,
    /// Print the policies without storing them.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The policies of one config file, and what was left out.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Conversion {
    /// One policy per descriptor path with a limit, in file order.
    pub(crate) policies: Vec<pb::Policy>,
    /// Descriptors and settings that were not imported, and why.
    pub(crate) notes: Vec<String>,
}

/// The root of an envoyproxy/ratelimit config file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    domain: Scalar,
    #[serde(default)]
    descriptors: Vec<DescriptorConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorConfig {
    key: Scalar,
    #[serde(default)]
    value: Option<Scalar>,
    #[serde(default)]
    rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    descriptors: Vec<DescriptorConfig>,
    #[serde(default)]
    shadow_mode: bool,
    /// Metrics detail in envoyproxy/ratelimit; agentmesh metrics never carry keys.
    #[serde(default, rename = "detailed_metric")]
    _detailed_metric: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitConfig {
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    requests_per_unit: u32,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<serde_norway::Value>,
}

/// A YAML scalar read as text, as envoyproxy/ratelimit reads keys and values (`value: 500`).
struct Scalar(String);

impl Scalar {
    fn into_text(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl serde::de::Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Converts an envoyproxy/ratelimit config file into policies.
///
/// # Errors
/// Invalid YAML (naming the line and column), an unknown field, an empty domain or key, a bad
/// unit, `requests_per_unit: 0`, a duplicate descriptor, or a name or depth past the bounds.
pub(crate) fn convert(yaml: &str) -> anyhow::Result<Conversion> {
    let file: ConfigFile = serde_norway::from_str(yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let domain = file.domain.into_text();
    if domain.is_empty()
        || domain.len() > MAX_NAMESPACE_LEN
        || domain.contains('/')
        || domain.bytes().any(|b| b.is_ascii_control())
    {
        bail!(
            "domain {domain:?}: must be 1 to {MAX_NAMESPACE_LEN} bytes without control characters or '/'"
        );
    }
    let mut conversion = Conversion::default();
    let mut path = Vec::new();
    convert_level(
        &domain,
        "descriptors",
        file.descriptors,
        &mut path,
        &mut conversion,
    )?;
    if conversion.policies.len() > MAX_POLICIES {
        bail!(
            "{} policies: at most {MAX_POLICIES} can be imported at once",
            conversion.policies.len()
        );
    }
    Ok(conversion)
}

/// Converts the descriptors of one level of the tree under `path` (the entries above it).
fn convert_level(
    domain: &str,
    field: &str,
    descriptors: Vec<DescriptorConfig>,
    path: &mut Vec<(String, Option<String>)>,
    out: &mut Conversion,
) -> anyhow::Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (i, descriptor) in descriptors.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        let key = descriptor.key.into_text();
        let value = descriptor
            .value
            .map(Scalar::into_text)
            .filter(|v| !v.is_empty());
        if key.is_empty() {
            bail!("{field}.key: must not be empty");
        }
        if !seen.insert((key.clone(), value.clone())) {
            bail!(
                "{field}: duplicate descriptor {}",
                entry_text(&key, value.as_deref())
            );
        }
        path.push((key, value));
        let label = format!("{field} ({})", path_text(path));
        if path.len() > MAX_DESCRIPTOR_ENTRIES {
            bail!("{label}: descriptors nest at most {MAX_DESCRIPTOR_ENTRIES} deep");
        }
        if path
            .last()
            .and_then(|(_, v)| v.as_deref())
            .is_some_and(|v| v.ends_with('*'))
        {
            out.notes.push(format!(
                "{label}: skipped with everything under it: wildcard values are not supported"
            ));
            path.pop();
            continue;
        }
        if let Some(rate_limit) = descriptor.rate_limit
            && let Some(mut policy) = convert_limit(domain, &label, path, rate_limit, out)?
        {
            if descriptor.shadow_mode {
                policy.mode = pb::Mode::Shadow as i32;
            }
            out.policies.push(policy);
        }
        convert_level(
            domain,
            &format!("{field}.descriptors"),
            descriptor.descriptors,
            path,
            out,
        )?;
        path.pop();
    }
    Ok(())
}

/// The policy of one `rate_limit`, or `None` (with a note) when it cannot be imported.
fn convert_limit(
    domain: &str,
    label: &str,
    path: &[(String, Option<String>)],
    rate_limit: RateLimitConfig,
    out: &mut Conversion,
) -> anyhow::Result<Option<pb::Policy>> {
    if rate_limit.unlimited {
        if rate_limit.unit.is_some() {
            bail!("{label}.rate_limit: an unlimited limit must not set a unit");
        }
        out.notes.push(format!(
            "{label}: skipped: unlimited has no agentmesh equivalent; requests it matches are \
             limited by a less specific policy if one matches them, else not at all"
        ));
        return Ok(None);
    }
    let Some(unit) = rate_limit.unit else {
        bail!("{label}.rate_limit.unit: required");
    };
    let Some(period) = unit_period(&unit) else {
        bail!(
            "{label}.rate_limit.unit: {unit:?} is not second, minute, hour, day, week, month or year"
        );
    };
    if rate_limit.requests_per_unit == 0 {
        bail!(
            "{label}.rate_limit.requests_per_unit: must be at least 1 (a limit of 0, denying \
             everything, cannot be imported)"
        );
    }
    if rate_limit.name.is_some() || !rate_limit.replaces.is_empty() {
        out.notes.push(format!(
            "{label}: rate_limit name and replaces ignored: the policy is named by its path"
        ));
    }
    let entries: Vec<(&str, Option<&str>)> = path
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    let name = descriptor_policy_name(&entries);
    if name.len() > MAX_POLICY_NAME_LEN {
        bail!(
            "{label}: its policy name is {} bytes, at most {MAX_POLICY_NAME_LEN}: shorten keys or values",
            name.len()
        );
    }
    Ok(Some(pb::Policy {
        namespace: domain.to_owned(),
        name,
        limit: Some(pb::LimitSpec {
            limit: u64::from(rate_limit.requests_per_unit),
            period: Some(proto_duration(period)),
            burst: 0,
            algorithm: pb::Algorithm::FixedWindow as i32,
        }),
        mode: pb::Mode::Enforce as i32,
        ..pb::Policy::default()
    }))
}

fn entry_text(key: &str, value: Option<&str>) -> String {
    match value {
        Some(value) => format!("{key}={value}"),
        None => key.to_owned(),
    }
}

fn path_text(path: &[(String, Option<String>)]) -> String {
    path.iter()
        .map(|(k, v)| entry_text(k, v.as_deref()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn run(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let file = &args.file;
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if size > MAX_POLICY_FILE_BYTES {
        bail!(
            "{}: {size} bytes, at most {MAX_POLICY_FILE_BYTES}",
            file.display()
        );
    }
    let yaml =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let conversion = convert(&yaml).with_context(|| file.display().to_string())?;
    for note in &conversion.notes {
        eprintln!("note: {note}");
    }
    if args.dry_run {
        print_policies(&conversion.policies, args.output);
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = super::client_for(&args.addr).await?;
    let total = conversion.policies.len();
    let mut stored = Vec::with_capacity(total);
    for policy in conversion.policies {
        let id = format!("{}/{}", policy.namespace, policy.name);
        let request = pb::PutPolicyRequest {
            policy: Some(policy),
            expected_version: 0,
        };
        match client.put_policy(request).await {
            Ok(response) => stored.push(response.into_inner()),
            Err(status) => bail!(
                "PutPolicy {id} failed: {:?}: {}; {} of {total} policies stored",
                status.code(),
                status.message(),
                stored.len()
            ),
        }
    }
    print_policies(&stored, args.output);
    Ok(ExitCode::SUCCESS)
}

fn print_policies(policies: &[pb::Policy], output: Output) {
    let limit_text = |p: &pb::Policy| {
        let limit = p.limit.as_ref();
        let period = limit
            .and_then(|l| l.period)
            .map(|d| u64::try_from(d.seconds).unwrap_or(0))
            .unwrap_or_default();
        let period = humantime::format_duration(std::time::Duration::from_secs(period));
        (limit.map_or(0, |l| l.limit), period.to_string())
    };
    let mode = |p: &pb::Policy| {
        if p.mode == pb::Mode::Shadow as i32 {
            "shadow"
        } else {
            "enforce"
        }
    };
    match output {
        Output::Json => {
            let policies: Vec<_> = policies
                .iter()
                .map(|p| {
                    let (limit, period) = limit_text(p);
                    serde_json::json!({
                        "namespace": p.namespace,
                        "name": p.name,
                        "limit": limit,
                        "period": period,
                        "algorithm": "fixed_window",
                        "mode": mode(p),
                        "version": p.version,
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "policies": policies }));
        }
        Output::Table => {
            for p in policies {
                let (limit, period) = limit_text(p);
                println!(
                    "{}/{}  {limit} per {period} (fixed window)  {}{}",
                    p.namespace,
                    p.name,
                    mode(p),
                    if p.version > 0 {
                        format!("  version={}", p.version)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, limit: u64, seconds: i64, mode: pb::Mode) -> pb::Policy {
        pb::Policy {
            namespace: "edge".into(),
            name: name.into(),
            limit: Some(pb::LimitSpec {
                limit,
                period: Some(prost_types::Duration { seconds, nanos: 0 }),
                burst: 0,
                algorithm: pb::Algorithm::FixedWindow as i32,
            }),
            mode: mode as i32,
            ..pb::Policy::default()
        }
    }

    fn error(yaml: &str) -> String {
        format!("{:#}", convert(yaml).unwrap_err())
    }

    #[test]
    fn test_nested_descriptors_with_values_and_shadow_become_named_policies() {
        let yaml = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit:
      unit: minute
      requests_per_unit: 100
    detailed_metric: true
  - key: remote_address
    value: 10.0.0.1
    shadow_mode: true
    rate_limit:
      unit: SECOND
      requests_per_unit: 5
  - key: generic_key
    value: api
    descriptors:
      - key: path
        value: 500
        rate_limit: { unit: month, requests_per_unit: 1000 }
      - key: user
        rate_limit: { unit: Day, requests_per_unit: 7 }
        descriptors:
          - key: model
            value: "gpt.4"
            rate_limit: { unit: year, requests_per_unit: 2 }
"#;
        let conversion = convert(yaml).unwrap();
        assert_eq!(
            conversion.policies,
            [
                policy("envoy:remote_address", 100, 60, pb::Mode::Enforce),
                policy(
                    "envoy:remote_address=10%2E0%2E0%2E1",
                    5,
                    1,
                    pb::Mode::Shadow
                ),
                policy(
                    "envoy:generic_key=api.path=500",
                    1000,
                    30 * 86_400,
                    pb::Mode::Enforce
                ),
                policy("envoy:generic_key=api.user", 7, 86_400, pb::Mode::Enforce),
                policy(
                    "envoy:generic_key=api.user.model=gpt%2E4",
                    2,
                    365 * 86_400,
                    pb::Mode::Enforce
                ),
            ]
        );
        assert!(conversion.notes.is_empty(), "{:?}", conversion.notes);
    }

    #[test]
    fn test_unlimited_and_wildcard_descriptors_are_skipped_with_a_note() {
        let yaml = "
domain: edge
descriptors:
  - key: remote_address
    value: 10.0.0.9
    rate_limit: { unlimited: true }
    descriptors:
      - key: path
        rate_limit: { unit: second, requests_per_unit: 1 }
  - key: path
    value: /api/*
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 3, name: per-user }
";
        let conversion = convert(yaml).unwrap();
        let names: Vec<_> = conversion
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["envoy:remote_address=10%2E0%2E0%2E9.path", "envoy:user"]
        );
        assert_eq!(conversion.notes.len(), 3, "{:?}", conversion.notes);
        assert!(
            conversion.notes[0].starts_with("descriptors[0] (remote_address=10.0.0.9): skipped"),
            "{}",
            conversion.notes[0]
        );
        assert!(
            conversion.notes[1].contains("wildcard"),
            "{}",
            conversion.notes[1]
        );
        assert!(conversion.notes[2].contains("name and replaces ignored"));
    }

    #[test]
    fn test_bad_yaml_names_the_line() {
        let message = error("domain: edge\ndescriptors:\n  - key: a\n    value: [\n");
        assert!(message.contains("line"), "{message}");
        let message = error("domain: edge\ndescriptors:\n  - key: a\n    limit: 3\n");
        assert!(message.contains("unknown field `limit`"), "{message}");
        assert!(message.contains("line 4"), "{message}");
        let message = error("domain: edge\ndescriptors:\n  - key: a\n    value: {x: 1}\n");
        assert!(
            message.starts_with("descriptors[0].value: invalid type: map, expected a string"),
            "{message}"
        );
        assert!(message.contains("line 4"), "{message}");
    }

    #[test]
    fn test_invalid_configs_are_rejected_naming_the_descriptor() {
        let cases = [
            ("domain: ''\n", "domain \"\": must be 1 to 128 bytes"),
            (
                "domain: edge\ndescriptors:\n  - key: ''\n",
                "descriptors[0].key: must not be empty",
            ),
            (
                "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n",
                "descriptors[0] (a).rate_limit.unit: \"fortnight\" is not",
            ),
            (
                "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { unit: second }\n",
                "descriptors[0] (a).rate_limit.requests_per_unit: must be at least 1",
            ),
            (
                "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { requests_per_unit: 1 }\n",
                "descriptors[0] (a).rate_limit.unit: required",
            ),
            (
                "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, unit: second }\n",
                "descriptors[0] (a).rate_limit: an unlimited limit must not set a unit",
            ),
            (
                "domain: edge\ndescriptors:\n  - key: a\n    value: b\n  - key: a\n    value: b\n",
                "descriptors[1]: duplicate descriptor a=b",
            ),
        ];
        for (yaml, expected) in cases {
            let message = error(yaml);
            assert!(
                message.starts_with(expected),
                "{yaml}\n got: {message}\nwant: {expected}"
            );
        }
        let long = format!(
            "domain: edge\ndescriptors:\n  - key: k\n    value: {}\n    rate_limit: {{ unit: second, requests_per_unit: 1 }}\n",
            "v".repeat(300)
        );
        assert!(error(&long).contains("policy name is"), "{}", error(&long));
    }
}
