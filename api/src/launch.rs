//! The launch contract of a job's processes: the command line and environment of `kiln
//! driver` and `kiln executor`. The CLI parses them with [`DriverLaunch`] and
//! [`ExecutorLaunch`]; the operator's pod builder and the local runner write them with the
//! same types ([`DriverLaunch::command_line`], [`ExecutorLaunch::env`]), so the compiler
//! checks both sides.
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// The per-job secret executors present to the driver. It travels by environment only, never
/// on a command line (where `ps` and pod specs would show it).
pub const ENV_TOKEN: &str = "KILN_TOKEN";
/// The driver's control service an executor dials, `http://host:port`.
pub const ENV_DRIVER: &str = "KILN_DRIVER";
/// An executor's id, unique within the job.
pub const ENV_EXECUTOR_ID: &str = "KILN_EXECUTOR_ID";
/// The address other executors reach an executor at.
pub const ENV_ADVERTISE_HOST: &str = "KILN_ADVERTISE_HOST";
/// Where the driver writes its short report for the operator.
pub const ENV_TERMINATION_MESSAGE: &str = "KILN_TERMINATION_MESSAGE";
/// The job's identity across driver restarts (a ComputeJob's `metadata.uid`).
pub const ENV_JOB_UID: &str = "KILN_JOB_UID";
/// Faults an executor injects, for tests.
pub const ENV_FAULTS: &str = "KILN_FAULTS";
/// Port of the driver's control service.
pub const DRIVER_PORT: u16 = 7077;
/// Port of an executor's block service in a pod: fixed, so that a replacement driver can
/// reach the executors of the driver it replaces at their pod IPs.
pub const EXECUTOR_PORT: u16 = 7078;
/// Where an executor serves blocks unless told otherwise.
pub const DEFAULT_EXECUTOR_HOST: &str = "0.0.0.0";
/// An executor's work directory unless told otherwise.
pub const DEFAULT_WORK_DIR: &str = "/tmp/kiln";

/// The driver's default address: every interface, [`DRIVER_PORT`].
pub fn default_driver_bind() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, DRIVER_PORT))
}

/// How `kiln driver` is started.
#[derive(Clone, PartialEq, Eq, clap::Args)]
pub struct DriverLaunch {
    /// The job file (job spec or ComputeJob manifest).
    #[arg(long)]
    pub spec: PathBuf,
    /// Address of the control service.
    #[arg(long, default_value_t = default_driver_bind())]
    pub bind: SocketAddr,
    /// The per-job secret executors must present.
    #[arg(long, env = ENV_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds without a heartbeat before an executor is declared lost (default: the job's
    /// `failurePolicy.heartbeatTimeoutSeconds`).
    #[arg(long)]
    pub heartbeat_timeout: Option<u64>,
    /// Where to write the full JSON job summary.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Where to write the short JSON report (at most 4 KiB) the operator copies into the
    /// ComputeJob's status, e.g. `/dev/termination-log`.
    #[arg(long, env = ENV_TERMINATION_MESSAGE)]
    pub termination_message: Option<PathBuf>,
    /// The job's identity across driver restarts (a ComputeJob's uid): committed output that
    /// names it is this job's own (default: a fresh id for this run).
    #[arg(long, env = ENV_JOB_UID)]
    pub job_uid: Option<String>,
    /// This driver's attempt, counting from 1: a replacement driver has a higher one, and
    /// executors follow only the highest they have seen (an older driver is fenced off).
    #[arg(long, default_value_t = 1)]
    pub epoch: u64,
    /// Block-service addresses (`host:port`, comma-separated) of executors an earlier driver
    /// of this job left behind: this driver takes them over, with the blocks they hold.
    #[arg(long, value_delimiter = ',')]
    pub attach: Vec<String>,
    /// Let the job's HTTP inputs connect to the loopback network (`kiln run`: the machine
    /// is the user's own); on a cluster, loopback is the pod itself and is refused.
    #[arg(long)]
    pub allow_loopback: bool,
}

/// How `kiln executor` is started.
#[derive(Clone, PartialEq, Eq, clap::Args)]
pub struct ExecutorLaunch {
    /// The driver's control service, `http://host:port`.
    #[arg(long, env = ENV_DRIVER)]
    pub driver: String,
    /// This executor's id, unique within the job.
    #[arg(long, env = ENV_EXECUTOR_ID)]
    pub id: String,
    /// Address to serve blocks on.
    #[arg(long, default_value = DEFAULT_EXECUTOR_HOST)]
    pub host: String,
    /// Port to serve blocks on (0: any free port; pods use [`EXECUTOR_PORT`]).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Address other executors reach this one at (default: --host).
    #[arg(long, env = ENV_ADVERTISE_HOST)]
    pub advertise_host: Option<String>,
    /// Concurrent tasks (default: from the job spec).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Memory budget, a quantity like 4Gi (default: executors.memory of the job).
    #[arg(long)]
    pub memory: Option<String>,
    /// Where blocks and operators spill.
    #[arg(long, default_value = DEFAULT_WORK_DIR)]
    pub work_dir: PathBuf,
    /// The per-job secret.
    #[arg(long, env = ENV_TOKEN, hide_env_values = true, default_value = "")]
    pub token: String,
    /// Faults to inject for tests, e.g. `drop-report=2,lose-report=1`.
    #[arg(long, env = ENV_FAULTS, default_value = "", hide = true)]
    pub faults: String,
    /// Let the job's HTTP inputs and output connect to the loopback network (as
    /// [`DriverLaunch::allow_loopback`]).
    #[arg(long)]
    pub allow_loopback: bool,
}

/// `--name=value`: one argument, so a value that starts with `-` (or is empty) stays a value.
fn flag(name: &str, value: impl fmt::Display) -> String {
    format!("--{name}={value}")
}

/// Parses flags (no program name, no subcommand) as the CLI does, the process environment
/// filling in what they leave out.
fn parse<L: clap::Args + clap::FromArgMatches>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<L, clap::Error> {
    let command = L::augment_args(clap::Command::new("kiln").no_binary_name(true));
    L::from_arg_matches_mut(&mut command.try_get_matches_from(args)?)
}

/// `subcommand`, then `args`.
fn with_subcommand(subcommand: &str, args: Vec<String>) -> Vec<String> {
    std::iter::once(subcommand.to_string())
        .chain(args)
        .collect()
}

fn redacted(token: &str) -> &'static str {
    if token.is_empty() { "" } else { "<redacted>" }
}

impl DriverLaunch {
    /// The `kiln` subcommand that runs a driver.
    pub const SUBCOMMAND: &'static str = "driver";

    /// The flags of this launch: every field but the token, which goes by environment
    /// ([`Self::env`]). Paths that are not UTF-8 are written lossily.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![flag("spec", self.spec.display()), flag("bind", self.bind)];
        if let Some(s) = self.heartbeat_timeout {
            args.push(flag("heartbeat-timeout", s));
        }
        if let Some(p) = &self.summary {
            args.push(flag("summary", p.display()));
        }
        if let Some(p) = &self.termination_message {
            args.push(flag("termination-message", p.display()));
        }
        if let Some(uid) = &self.job_uid {
            args.push(flag("job-uid", uid));
        }
        if self.epoch != 1 {
            args.push(flag("epoch", self.epoch));
        }
        if !self.attach.is_empty() {
            args.push(flag("attach", self.attach.join(",")));
        }
        if self.allow_loopback {
            args.push("--allow-loopback".into());
        }
        args
    }

    /// `kiln`'s arguments for this launch: [`Self::SUBCOMMAND`], then [`Self::to_args`].
    pub fn command_line(&self) -> Vec<String> {
        with_subcommand(Self::SUBCOMMAND, self.to_args())
    }

    /// The environment variables (name, value) to set beside [`Self::to_args`]: those of
    /// the fields that travel by environment only (the token).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.token.iter().map(|t| (ENV_TOKEN, t.clone())).collect()
    }

    /// Parses flags as [`Self::to_args`] writes them (no program name, no subcommand); what
    /// they leave out comes from the process environment, as in the CLI.
    pub fn parse_args(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Self, clap::Error> {
        parse(args)
    }
}

impl ExecutorLaunch {
    /// The `kiln` subcommand that runs an executor.
    pub const SUBCOMMAND: &'static str = "executor";

    /// The flags of this launch: every field but the token, which goes by environment
    /// ([`Self::env`]); no `--faults` when there are none, so a launcher's own `KILN_FAULTS`
    /// still reaches the executor. Paths that are not UTF-8 are written lossily.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            flag("driver", &self.driver),
            flag("id", &self.id),
            flag("host", &self.host),
        ];
        if self.port != 0 {
            args.push(flag("port", self.port));
        }
        if let Some(h) = &self.advertise_host {
            args.push(flag("advertise-host", h));
        }
        if let Some(n) = self.slots {
            args.push(flag("slots", n));
        }
        if let Some(m) = &self.memory {
            args.push(flag("memory", m));
        }
        args.push(flag("work-dir", self.work_dir.display()));
        if !self.faults.is_empty() {
            args.push(flag("faults", &self.faults));
        }
        if self.allow_loopback {
            args.push("--allow-loopback".into());
        }
        args
    }

    /// `kiln`'s arguments for this launch: [`Self::SUBCOMMAND`], then [`Self::to_args`].
    pub fn command_line(&self) -> Vec<String> {
        with_subcommand(Self::SUBCOMMAND, self.to_args())
    }

    /// The environment variables (name, value) to set beside [`Self::to_args`]: those of
    /// the fields that travel by environment only (the token, when there is one).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        if self.token.is_empty() {
            Vec::new()
        } else {
            vec![(ENV_TOKEN, self.token.clone())]
        }
    }

    /// Parses flags as [`Self::to_args`] writes them (no program name, no subcommand); what
    /// they leave out comes from the process environment, as in the CLI.
    pub fn parse_args(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Self, clap::Error> {
        parse(args)
    }
}

/// Shows every field but the token's value.
impl fmt::Debug for DriverLaunch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverLaunch")
            .field("spec", &self.spec)
            .field("bind", &self.bind)
            .field("token", &self.token.as_deref().map(redacted))
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("summary", &self.summary)
            .field("termination_message", &self.termination_message)
            .field("job_uid", &self.job_uid)
            .field("epoch", &self.epoch)
            .field("attach", &self.attach)
            .finish()
    }
}

/// Shows every field but the token's value.
impl fmt::Debug for ExecutorLaunch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorLaunch")
            .field("driver", &self.driver)
            .field("id", &self.id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("advertise_host", &self.advertise_host)
            .field("slots", &self.slots)
            .field("memory", &self.memory)
            .field("work_dir", &self.work_dir)
            .field("token", &redacted(&self.token))
            .field("faults", &self.faults)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct D {
        #[command(flatten)]
        l: DriverLaunch,
    }

    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct E {
        #[command(flatten)]
        l: ExecutorLaunch,
    }

    fn driver() -> DriverLaunch {
        DriverLaunch {
            spec: "/etc/kiln/job.yaml".into(),
            bind: default_driver_bind(),
            token: None,
            heartbeat_timeout: None,
            summary: None,
            termination_message: None,
            job_uid: None,
            epoch: 1,
            attach: Vec::new(),
            allow_loopback: false,
        }
    }

    fn executor() -> ExecutorLaunch {
        ExecutorLaunch {
            driver: "http://10.0.0.1:7077".into(),
            id: "wc-exec-0".into(),
            host: DEFAULT_EXECUTOR_HOST.into(),
            port: 0,
            advertise_host: None,
            slots: None,
            memory: None,
            work_dir: DEFAULT_WORK_DIR.into(),
            token: String::new(),
            faults: String::new(),
            allow_loopback: false,
        }
    }

    #[test]
    fn driver_launches_round_trip_through_the_cli() {
        let all = DriverLaunch {
            spec: "/jobs/a b/-odd.yaml".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            heartbeat_timeout: Some(7),
            summary: Some("/tmp/summary.json".into()),
            termination_message: Some("/dev/termination-log".into()),
            job_uid: Some("6f1c-uid".into()),
            epoch: 3,
            attach: vec!["10.244.1.7:7078".into(), "10.244.2.9:7078".into()],
            allow_loopback: true,
            ..driver()
        };
        for l in [driver(), all] {
            let back = D::try_parse_from(l.to_args()).unwrap().l;
            assert_eq!(back, l, "{:?}", l.to_args());
            assert_eq!(DriverLaunch::parse_args(l.to_args()).unwrap(), l);
            assert_eq!(l.command_line()[0], "driver");
            assert_eq!(l.command_line()[1..], l.to_args());
        }
    }

    #[test]
    fn executor_launches_round_trip_through_the_cli() {
        let all = ExecutorLaunch {
            host: "127.0.0.1".into(),
            port: EXECUTOR_PORT,
            advertise_host: Some("10.244.1.7".into()),
            slots: Some(3),
            memory: Some("4Gi".into()),
            work_dir: "/var/lib/kiln/exec-0".into(),
            faults: "drop-report=2,lose-report=1".into(),
            id: "-dash".into(),
            allow_loopback: true,
            ..executor()
        };
        for l in [executor(), all] {
            let back = E::try_parse_from(l.to_args()).unwrap().l;
            assert_eq!(back, l, "{:?}", l.to_args());
            assert_eq!(ExecutorLaunch::parse_args(l.to_args()).unwrap(), l);
            assert_eq!(l.command_line()[0], "executor");
        }
        assert!(
            !executor()
                .to_args()
                .iter()
                .any(|a| a.starts_with("--faults")),
            "no faults: the launcher's environment decides"
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = DriverLaunch::parse_args(["--spec", "job.yaml"]).unwrap();
        assert_eq!(d.bind.to_string(), "0.0.0.0:7077");
        let e = ExecutorLaunch::parse_args(["--driver", "http://d:7077", "--id", "e"]).unwrap();
        assert_eq!(
            (e.host.as_str(), e.work_dir.to_str()),
            ("0.0.0.0", Some("/tmp/kiln"))
        );
    }

    #[test]
    fn the_token_goes_by_environment_only() {
        let secret = "s3cr3t";
        let d = DriverLaunch {
            token: Some(secret.into()),
            ..driver()
        };
        let e = ExecutorLaunch {
            token: secret.into(),
            ..executor()
        };
        for (args, env, debug) in [
            (d.to_args(), d.env(), format!("{d:?}")),
            (e.to_args(), e.env(), format!("{e:?}")),
        ] {
            assert!(!args.iter().any(|a| a.contains(secret)), "{args:?}");
            assert_eq!(env, [(ENV_TOKEN, secret.to_string())]);
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(driver().env().is_empty() && executor().env().is_empty());
        let back = E::try_parse_from(e.to_args()).unwrap().l;
        assert_eq!(
            ExecutorLaunch {
                token: secret.into(),
                ..back
            },
            e
        );
    }
}
