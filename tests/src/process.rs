//! A child process owned by a test: output captured to files, killed on drop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a process gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// How much of each log a start-up failure shows.
const TAIL_BYTES: u64 = 4096;
/// Starts tried on fresh ports when the port chosen was taken meanwhile.
pub(crate) const START_ATTEMPTS: usize = 3;

/// True when a process's output says its port was taken (another process grabbed it after
/// `free_port` released it): worth a retry on other ports.
pub(crate) fn says_port_taken(output: &str) -> bool {
    output.to_lowercase().contains("address already in use")
}

pub(crate) struct ChildProcess {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildProcess {
    /// Spawns `command` with stdout/stderr appended to `<dir>/<name>.stdout.log` and
    /// `<dir>/<name>.stderr.log` (appended, so restarts keep the earlier runs' output).
    pub(crate) fn spawn(name: &str, mut command: Command, dir: &Path) -> anyhow::Result<Self> {
        let stdout_path = dir.join(format!("{name}.stdout.log"));
        let stderr_path = dir.join(format!("{name}.stderr.log"));
        let stdout = append(&stdout_path)?;
        let stderr = append(&stderr_path)?;
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait; SIGKILL if it has not exited within the grace period.
    pub(crate) fn terminate(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit within {TERM_GRACE:?} of SIGTERM; killing it",
            self.name
        );
        self.kill();
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last few KiB of the process's stdout and stderr.
    pub(crate) fn log_tail(&self) -> String {
        format!(
            "--- {name} stdout (tail of {out}) ---\n{}\n--- {name} stderr (tail of {err}) ---\n{}",
            tail(&self.stdout_path),
            tail(&self.stderr_path),
            name = self.name,
            out = self.stdout_path.display(),
            err = self.stderr_path.display(),
        )
    }

    /// True when the logs say the port was taken (another process grabbed it after
    /// `free_port` released it): worth a retry on other ports.
    pub(crate) fn port_conflict(&self) -> bool {
        says_port_taken(&format!(
            "{}{}",
            tail(&self.stdout_path),
            tail(&self.stderr_path)
        ))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return "(no output)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
