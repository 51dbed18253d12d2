//! `meshctl token issue`: development tokens (HS256, signed with a local secret file) for
//! clusters run with `--auth-hs256-secret-file`; production tokens come from your identity
//! provider.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentmesh_runtime::auth::{Role, TokenClaims, issue_hs256};
use agentmesh_runtime::config::parse_duration;
use anyhow::{Context, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Print a signed development token.
    Issue(IssueArgs),
}

#[derive(clap::Args)]
pub(crate) struct IssueArgs {
    /// File holding the HS256 secret (at least 32 bytes).
    #[arg(long)]
    secret_file: PathBuf,
    /// Subject (`sub`): who the caller is.
    #[arg(long)]
    sub: String,
    /// Roles, comma-separated: agent, service, operator, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    roles: Vec<String>,
    /// Tenant: the namespace prefix the caller owns (none: cluster-wide).
    #[arg(long)]
    tenant: Option<String>,
    /// The agent id an agent's token acts as.
    #[arg(long)]
    agent_id: Option<String>,
    /// Issuer (`iss`).
    #[arg(long)]
    issuer: Option<String>,
    /// Audience (`aud`).
    #[arg(long)]
    audience: Option<String>,
    /// Lifetime.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
}

pub(crate) fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Issue(args) => {
            let secret = std::fs::read(&args.secret_file)
                .with_context(|| format!("cannot read {}", args.secret_file.display()))?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                bail!(
                    "{}: the secret must be at least 32 bytes",
                    args.secret_file.display()
                );
            }
            let mut roles = Vec::new();
            for name in &args.roles {
                roles.push(Role::parse(name).with_context(|| {
                    format!("--roles: {name:?} is not agent, service, operator or admin")
                })?);
            }
            if let Some(tenant) = &args.tenant
                && !agentmesh_runtime::auth::verify::valid_tenant(tenant)
            {
                bail!("--tenant {tenant:?}: 1 to 64 bytes of [A-Za-z0-9_-], and not \"sys\"");
            }
            let mut claims = TokenClaims::new(&args.sub, &roles, args.ttl);
            claims.iss = args.issuer;
            claims.aud = args.audience;
            claims.tenant = args.tenant;
            claims.agent_id = args.agent_id;
            println!(
                "{}",
                issue_hs256(secret, &claims).map_err(anyhow::Error::msg)?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
