//! `meshctl tasks` against a real `agentmesh serve scheduler` process: submit (idempotent),
//! cancel, get, list and watch a task nobody runs; submit `--wait` on tasks an example-agent
//! process runs, exiting 0 with the output when the task succeeds and 1 with the error when it
//! fails.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentmesh_tests::agentmesh::{AgentmeshProcess, binary, run_binary};
use agentmesh_tests::wait_until;

/// Runs `meshctl tasks <args> --addr <scheduler>`: (exit code, stdout, stderr).
fn meshctl(scheduler: &AgentmeshProcess, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let addr = format!("http://{}", scheduler.grpc_addr);
    let mut all = vec!["tasks"];
    all.extend(args);
    all.extend(["--addr", &addr]);
    run_binary("meshctl", &all)
}

fn json(out: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(out.trim())?)
}

/// An example-agent process, killed on drop.
struct ExampleAgent(Child);

impl ExampleAgent {
    async fn start(scheduler: &AgentmeshProcess, id: &str) -> anyhow::Result<Self> {
        let addr = format!("http://{}", scheduler.grpc_addr);
        let agent = Self(
            Command::new(binary("example-agent")?)
                .args(["--scheduler", &addr, "--id", id, "--capacity", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_until(Duration::from_secs(10), "agent ready", || {
            let ready = run_binary(
                "meshctl",
                &["agents", "show", id, "-o", "json", "--addr", &addr],
            )
            .ok()
            .and_then(|(_, out, _)| json(&out).ok())
            .is_some_and(|a| a["state"] == "ready");
            async move { ready }
        })
        .await?;
        Ok(agent)
    }
}

impl Drop for ExampleAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn test_a_task_nobody_runs_is_submitted_cancelled_and_shown_by_meshctl() -> anyhow::Result<()>
{
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;

    let (code, out, err) = meshctl(
        &scheduler,
        &[
            "submit",
            "nobody",
            "--payload",
            "x",
            "--label",
            "team=a",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    let submitted = json(&out)?;
    let id = submitted["task_id"].as_str().unwrap_or_default().to_owned();
    assert!(!id.is_empty(), "{out}");
    assert_eq!(submitted["existing"], false);
    assert_eq!(submitted["task"]["state"], "pending");
    assert_eq!(submitted["task"]["payload"], "x");
    assert_eq!(submitted["task"]["labels"]["team"], "a");

    // The same idempotency key answers the first task.
    let keyed = ["submit", "nobody", "--idempotency-key", "k-1"];
    let (code, first, err) = meshctl(&scheduler, &keyed)?;
    assert_eq!(code, 0, "{err}");
    let (code, again, err) = meshctl(&scheduler, &keyed)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(again.trim(), format!("{} existing", first.trim()));

    let (code, out, err) = meshctl(&scheduler, &["cancel", &id])?;
    assert_eq!(
        (code, out.trim()),
        (0, format!("cancelled {id}").as_str()),
        "{err}"
    );
    let (code, out, err) = meshctl(&scheduler, &["cancel", &id])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"), "{out}");

    let (code, out, err) = meshctl(&scheduler, &["get", &id, "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    let task = json(&out)?;
    assert_eq!(task["state"], "cancelled");
    assert_eq!(task["error"], "cancelled by operator");
    assert_eq!(task["type"], "nobody");
    let (code, out, err) = meshctl(&scheduler, &["get", &id])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("state") && l.ends_with("cancelled")),
        "{out}"
    );

    let (code, out, err) = meshctl(&scheduler, &["list", "--state", "cancelled", "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    let listed = json(&out)?;
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let (code, out, err) = meshctl(&scheduler, &["list", "--limit", "1", "--all"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "a header and both tasks: {out}");
    let (code, out, _) = meshctl(&scheduler, &["list", "--limit", "1"])?;
    assert_eq!((code, out.lines().count()), (0, 2), "{out}");

    // Watching a task that has ended: its state, its error, exit 1.
    let (code, out, err) = meshctl(&scheduler, &["watch", &id])?;
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("cancelled"), "{out}");
    assert!(err.contains("cancelled by operator"), "{err}");

    let (code, _, err) = meshctl(&scheduler, &["get", "0123456789abcdef0123456789abcdef"])?;
    assert_eq!(code, 1);
    assert!(err.contains("NotFound"), "{err}");
    Ok(())
}

#[tokio::test]
async fn test_submit_wait_exits_by_how_the_task_ended() -> anyhow::Result<()> {
    let scheduler = AgentmeshProcess::serve("scheduler", None, None, &[]).await?;
    let _agent = ExampleAgent::start(&scheduler, "example-1").await?;

    let (code, out, err) = meshctl(
        &scheduler,
        &["submit", "sleep", "--payload", "300", "--wait"],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 3, "id, changes, output: {out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("running  attempt 1  agent example-1")),
        "{out}"
    );
    assert!(
        lines[lines.len() - 2].starts_with("succeeded  attempt 1"),
        "{out}"
    );
    assert_eq!(lines.last(), Some(&"slept 300 ms"));

    let (code, out, err) = meshctl(
        &scheduler,
        &[
            "submit",
            "fail",
            "--payload",
            "boom",
            "--max-attempts",
            "1",
            "--wait",
        ],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.lines().last().is_some_and(|l| l.starts_with("failed")),
        "{out}"
    );
    assert!(err.contains("boom"), "{err}");
    Ok(())
}
