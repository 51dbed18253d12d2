//! `meshctl members`: who is in the cluster, from etcd.

use std::process::ExitCode;
use std::time::Duration;

use agentmesh_membership::{EtcdMembership, EtcdMembershipConfig, Member, Membership};
use agentmesh_runtime::config::ClusterArgs;
use anyhow::{Context, bail};

use crate::Output;

#[derive(clap::Args)]
pub(crate) struct MembersArgs {
    /// Only this service (eventbus, scheduler, cache, ratelimit, health).
    #[arg(long)]
    service: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub(crate) async fn run(cluster: &ClusterArgs, args: &MembersArgs) -> anyhow::Result<ExitCode> {
    if cluster.etcd_endpoints.is_empty() {
        bail!("no etcd endpoints: pass --etcd http://host:2379 or set AGENTMESH_ETCD_ENDPOINTS");
    }
    let membership = EtcdMembership::connect(EtcdMembershipConfig {
        endpoints: cluster.etcd_endpoints.clone(),
        prefix: cluster.etcd_prefix.clone(),
        lease_ttl: cluster.lease_ttl,
        connect_timeout: Duration::from_secs(3),
        tls: cluster.etcd_tls().map_err(anyhow::Error::msg)?,
    })
    .await
    .with_context(|| format!("cannot reach etcd at {}", cluster.etcd_endpoints.join(",")))?;
    let members: Vec<Member> = match &args.service {
        Some(service) => membership
            .list(service)
            .await?
            .members
            .into_values()
            .collect(),
        None => membership.list_all().await?,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&members)?),
        Output::Table => print!("{}", table(&members)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Members as an aligned text table.
fn table(members: &[Member]) -> String {
    let header = ["SERVICE", "INSTANCE", "GRPC", "ADMIN", "VERSION", "ZONE"];
    let rows: Vec<[String; 6]> = members
        .iter()
        .map(|m| {
            [
                m.service.clone(),
                m.instance_id.clone(),
                m.grpc_addr.clone(),
                m.admin_addr.clone(),
                m.version.clone(),
                if m.zone.is_empty() {
                    "-".to_owned()
                } else {
                    m.zone.clone()
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    if members.is_empty() {
        out.push_str("(no members)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_table_aligns_columns_and_marks_empty_zone() {
        let m = Member {
            service: "ratelimit".into(),
            instance_id: "ratelimit-1".into(),
            grpc_addr: "127.0.0.1:7104".into(),
            admin_addr: "127.0.0.1:9104".into(),
            version: "0.1.0".into(),
            zone: String::new(),
            started_at_ms: 0,
        };
        let text = table(&[m]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE    INSTANCE"));
        assert!(lines[1].ends_with("-"));
    }
}
