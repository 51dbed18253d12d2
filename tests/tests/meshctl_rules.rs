//! `meshctl rules` against a real `agentmesh dev` process: the example rules file validated on
//! the server by a dry run (nothing stored), applied, applied again (unchanged), a change shown
//! as a diff, get/list/stats/disable/enable/delete, and a bad file refused naming the field.

use agentmesh_tests::agentmesh::{AgentmeshProcess, run_binary};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rules/example.toml");

/// Runs `meshctl rules <args> --addr <scheduler>`: (exit code, stdout, stderr).
fn meshctl(dev: &AgentmeshProcess, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let addr = format!("http://{}", dev.addrs["scheduler"].0);
    let mut all = vec!["rules"];
    all.extend(args);
    all.extend(["--addr", &addr]);
    run_binary("meshctl", &all)
}

fn json(out: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_meshctl_applies_the_example_rules_and_manages_them() -> anyhow::Result<()> {
    let dev = AgentmeshProcess::dev().await?;

    let (code, out, err) = meshctl(&dev, &["apply", EXAMPLE, "--dry-run", "-o", "json"])?;
    assert_eq!(code, 0, "{out}{err}");
    let plan = json(&out)?;
    let rules = plan["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 7, "{plan}");
    assert!(rules.iter().all(|r| r["change"] == "create"), "{plan}");
    let (_, out, _) = meshctl(&dev, &["list", "-o", "json"])?;
    assert_eq!(
        json(&out)?.as_array().map(Vec::len),
        Some(0),
        "a dry run stores nothing"
    );

    let (code, out, err) = meshctl(&dev, &["apply", EXAMPLE])?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = meshctl(&dev, &["apply", EXAMPLE, "-o", "json"])?;
    assert_eq!(code, 0);
    assert!(
        json(&out)?["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .all(|r| r["change"] == "unchanged"),
        "{out}"
    );

    // What the file says comes back: a cascade and its fallback, a cancel, a correlation.
    let (code, out, err) = meshctl(&dev, &["get", "big-orders", "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    let rule = json(&out)?;
    assert_eq!(
        rule["responses"][1]["then"][0]["name"], "reviewed",
        "{rule}"
    );
    assert_eq!(rule["responses"][1]["fallback"]["name"], "review-failed");
    let (_, out, _) = meshctl(&dev, &["get", "order-reminder", "-o", "json"])?;
    assert_eq!(
        json(&out)?["responses"][0]["cancel"]["stimulus"]["subject"],
        "orders.cancelled"
    );
    let (_, out, _) = meshctl(&dev, &["get", "login-lockout", "-o", "json"])?;
    let rule = json(&out)?;
    assert_eq!(rule["correlation"]["count"], 3, "{rule}");
    assert_eq!(rule["correlation"]["window_ms"], 60_000);
    let (_, out, _) = meshctl(&dev, &["get", "abandoned-cart", "-o", "json"])?;
    assert_eq!(
        json(&out)?["correlation"]["not_followed_by"]["subject"],
        "carts.checkout"
    );

    // A change is shown as a diff and stored only without --dry-run.
    let changed = tempfile::NamedTempFile::new()?;
    std::fs::write(
        changed.path(),
        std::fs::read_to_string(EXAMPLE)?.replace("data.amount > 1000", "data.amount > 2000"),
    )?;
    let path = changed.path().to_str().expect("utf-8 path");
    let (code, out, err) = meshctl(&dev, &["apply", path, "--dry-run"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("update"), "{out}");
    assert!(
        out.contains("-  \"condition\": \"data.amount > 1000\"")
            && out.contains("+  \"condition\": \"data.amount > 2000\""),
        "{out}"
    );
    assert!(out.contains("dry run: nothing stored"), "{out}");

    let (code, out, _) = meshctl(&dev, &["list"])?;
    assert_eq!(code, 0);
    for name in [
        "big-orders",
        "login-lockout",
        "order-complete",
        "abandoned-cart",
    ] {
        assert!(out.contains(name), "{name} in {out}");
    }
    assert_eq!(meshctl(&dev, &["stats"])?.0, 0);
    assert_eq!(meshctl(&dev, &["disable", "big-orders"])?.0, 0);
    let (_, out, _) = meshctl(&dev, &["get", "big-orders", "-o", "json"])?;
    assert_eq!(json(&out)?["disabled"], true);
    assert_eq!(meshctl(&dev, &["enable", "big-orders"])?.0, 0);
    assert_eq!(meshctl(&dev, &["delete", "big-orders"])?.0, 0);
    let (code, _, err) = meshctl(&dev, &["get", "big-orders"])?;
    assert_ne!(code, 0);
    assert!(
        err.contains("NOT_FOUND") || err.contains("does not exist"),
        "{err}"
    );

    // A bad rule is refused by the server, naming the field.
    let bad = tempfile::NamedTempFile::new()?;
    std::fs::write(
        bad.path(),
        "[[rule]]\nname = \"bad\"\n[rule.stimulus]\nsubject = \"a.b\"\n[rule.correlation]\nkey = \"data.id\"\nwindow = \"1m\"\ncount = 1\n[[rule.response]]\nname = \"r\"\n[rule.response.publish]\nsubject = \"x\"\n",
    )?;
    let (code, _, err) = meshctl(&dev, &["apply", bad.path().to_str().expect("utf-8 path")])?;
    assert_ne!(code, 0);
    assert!(err.contains("rule.correlation.count"), "{err}");
    Ok(())
}
