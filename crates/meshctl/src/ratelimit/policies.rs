//! `meshctl ratelimit policies …`: read and delete stored policies (`import` writes them).

use std::process::ExitCode;

use agentmesh_proto::ratelimit::v1 as pb;

use crate::Output;

#[derive(clap::Args)]
pub(crate) struct PoliciesArgs {
    /// Rate limiter address.
    #[arg(
        long,
        env = "AGENTMESH_RATELIMIT_ADDR",
        default_value = "127.0.0.1:7104",
        global = true
    )]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Option<PoliciesCommand>,
}

#[derive(clap::Subcommand)]
enum PoliciesCommand {
    /// List stored policies (the default).
    List {
        /// Only this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Show one policy.
    Get {
        /// Namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// Policy name.
        name: String,
    },
    /// Delete one policy.
    Delete {
        /// Namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// Policy name.
        name: String,
        /// Delete only if the stored version is still this one.
        #[arg(long, default_value_t = 0)]
        expected_version: u64,
    },
}

/// `FAILURE_POLICY_FAIL_OPEN` with prefix `FAILURE_POLICY_` → `fail_open`.
fn enum_name(value: &str, prefix: &str) -> String {
    value.strip_prefix(prefix).unwrap_or(value).to_lowercase()
}

fn describe(p: &pb::Policy) -> [String; 6] {
    let limit = match (p.limit, p.budget) {
        (_, Some(budget)) => {
            let window = pb::BudgetWindow::try_from(budget.window)
                .map_or("?".into(), |w| enum_name(w.as_str_name(), "BUDGET_WINDOW_"));
            format!("{}/{window} budget", budget.limit)
        }
        (limit, None) => {
            let limit = limit.unwrap_or_default();
            let period = limit.period.map_or(0, |d| d.seconds);
            let algorithm = pb::Algorithm::try_from(limit.algorithm)
                .map_or("?".into(), |a| enum_name(a.as_str_name(), "ALGORITHM_"));
            format!("{}/{}s {algorithm}", limit.limit, period)
        }
    };
    let consistency = pb::Consistency::try_from(p.consistency)
        .map_or("?".into(), |c| enum_name(c.as_str_name(), "CONSISTENCY_"));
    let on_failure = pb::FailurePolicy::try_from(p.on_failure).map_or("?".into(), |f| {
        enum_name(f.as_str_name(), "FAILURE_POLICY_")
    });
    [
        p.namespace.clone(),
        p.name.clone(),
        limit,
        if consistency == "unspecified" {
            "-".into()
        } else {
            consistency
        },
        if on_failure == "unspecified" {
            "-".into()
        } else {
            on_failure
        },
        p.version.to_string(),
    ]
}

fn print(policies: &[pb::Policy], output: Output) {
    if output == Output::Json {
        let rows: Vec<serde_json::Value> = policies
            .iter()
            .map(|p| {
                let [namespace, name, limit, consistency, on_failure, version] = describe(p);
                serde_json::json!({"namespace": namespace, "name": name, "limit": limit,
                    "consistency": consistency, "on_failure": on_failure, "version": version})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    let header = [
        "NAMESPACE",
        "NAME",
        "LIMIT",
        "CONSISTENCY",
        "ON_FAILURE",
        "VERSION",
    ]
    .map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(policies.iter().map(describe))
        .collect();
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    if policies.is_empty() {
        println!("(no stored policies)");
    }
}

pub(crate) async fn run(args: PoliciesArgs) -> anyhow::Result<ExitCode> {
    let mut client = super::client_for(&args.addr).await?;
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    match args
        .command
        .unwrap_or(PoliciesCommand::List { namespace: None })
    {
        PoliciesCommand::List { namespace } => {
            let request = pb::ListPoliciesRequest {
                namespace: namespace.unwrap_or_default(),
            };
            let listed = client
                .list_policies(request)
                .await
                .map_err(status)?
                .into_inner();
            print(&listed.policies, args.output);
        }
        PoliciesCommand::Get { namespace, name } => {
            let policy = client
                .get_policy(pb::GetPolicyRequest { namespace, name })
                .await
                .map_err(status)?
                .into_inner();
            print(&[policy], args.output);
        }
        PoliciesCommand::Delete {
            namespace,
            name,
            expected_version,
        } => {
            client
                .delete_policy(pb::DeletePolicyRequest {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    expected_version,
                })
                .await
                .map_err(status)?;
            println!("deleted {namespace}/{name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_policies_are_described_in_lowercase_with_dashes_for_defaults() {
        let p = pb::Policy {
            namespace: "team-a".into(),
            name: "rpm".into(),
            limit: Some(pb::LimitSpec {
                limit: 100,
                period: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                burst: 0,
                algorithm: pb::Algorithm::SlidingWindow as i32,
            }),
            consistency: pb::Consistency::Strict as i32,
            on_failure: pb::FailurePolicy::FailOpen as i32,
            version: 7,
            ..Default::default()
        };
        assert_eq!(
            describe(&p),
            [
                "team-a",
                "rpm",
                "100/60s sliding_window",
                "strict",
                "fail_open",
                "7"
            ]
            .map(String::from)
        );
        let budget = pb::Policy {
            namespace: "team-a".into(),
            name: "usd".into(),
            budget: Some(pb::BudgetSpec {
                limit: 5_000_000,
                window: pb::BudgetWindow::Month as i32,
            }),
            version: 8,
            ..Default::default()
        };
        assert_eq!(describe(&budget)[2], "5000000/month budget");
    }
}
