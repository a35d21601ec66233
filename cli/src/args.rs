//! The command line: every command, flag and argument of `kiln` (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_schemas::status::JobType;

/// Kiln's command line: submit agent jobs and follow them live.
///
/// The server is `--url`, else $KILN_URL, else the URL of the last `kiln login`, else
/// http://127.0.0.1:8787. The credential is $KILN_TOKEN (a JWT or the service secret, used as is),
/// else the tokens `kiln login` saved for that URL in $KILN_CONFIG, else
/// $XDG_CONFIG_HOME/kiln/config.toml, else ~/.config/kiln/config.toml.
///
/// Exit status of `follow` and `submit --follow`: 0 completed, 1 failed, 2 cancelled; any other
/// error exits 3 with `kiln: error: ...` on stderr; bad usage exits 64; Ctrl-C while following
/// exits 130 and leaves the job running.
#[derive(Debug, Parser)]
#[command(name = "kiln", version)]
pub struct Cli {
    /// The Kiln server (overrides $KILN_URL and the configured URL).
    #[arg(long, global = true, value_name = "URL", display_order = 900)]
    pub url: Option<String>,

    /// Print one JSON document (JSON lines for `follow`) instead of text, for scripts.
    #[arg(long, global = true, display_order = 901)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Log in with email and password; saves the tokens in the config file.
    Login(Credentials),
    /// Create an account, then log in as it.
    Register(Credentials),
    /// Forget the tokens saved for the server.
    Logout,
    /// Submit a job (`POST /jobs`).
    Submit(Box<SubmitArgs>),
    /// Follow a job's live channel until it ends; exits 0 completed, 1 failed, 2 cancelled.
    Follow(FollowArgs),
    /// List jobs, newest first.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show one job.
    Show(JobId),
    /// Cancel a queued or running job.
    Cancel(JobId),
    /// Stop a ralph job after its current iteration (it still pushes its partial work).
    Stop(JobId),
    /// Send a message to a running task job.
    Message(MessageArgs),
    /// End a task job's session: it completes once the agent has answered.
    Complete(JobId),
    /// Retry a failed or cancelled job as a new job.
    Retry(JobId),
    /// Print a job's messages (stdout, stderr, system, user input), the whole log a page at a time.
    Logs(LogsArgs),
    /// A ralph job's iterations: exit codes, feedback commands, completion promise.
    Iterations(JobId),
    /// The server's health: queue and runners.
    #[command(alias = "health")]
    Status,
}

#[derive(Debug, Args)]
pub struct Credentials {
    /// Account email (prompted for when absent).
    #[arg(long)]
    pub email: Option<String>,
    /// Password (prompted for without echo when absent; prefer --password-stdin in scripts).
    #[arg(long, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TypeArg {
    Code,
    Task,
    Ralph,
}

impl From<TypeArg> for JobType {
    fn from(t: TypeArg) -> JobType {
        match t {
            TypeArg::Code => JobType::Code,
            TypeArg::Task => JobType::Task,
            TypeArg::Ralph => JobType::Ralph,
        }
    }
}

/// The fields of `POST /jobs` (seed 003), one flag each; a flag overrides the same field of `--file`.
#[derive(Debug, Default, Args)]
pub struct SubmitArgs {
    /// A JSON file with the request body (`-` for stdin); flags override its fields.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The task for the agent (`-` reads it from stdin).
    #[arg(long, short = 'p', conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// jobType: code (the default: one run, one commit, a pull request), task (interactive) or ralph (a loop).
    #[arg(long = "type", short = 't', value_enum)]
    pub job_type: Option<TypeArg>,
    /// githubOrg: the repository's owner (with --repo).
    #[arg(long)]
    pub org: Option<String>,
    /// githubRepo: the repository's name (with --org).
    #[arg(long)]
    pub repo: Option<String>,
    /// clientId: a client whose repository the job works on (instead of --org/--repo).
    #[arg(long)]
    pub client_id: Option<String>,
    /// branchName: the branch to push (required for code jobs, generated for task and ralph).
    #[arg(long, short = 'b')]
    pub branch: Option<String>,
    /// title: a short name for the job
    #[arg(long)]
    pub title: Option<String>,
    /// featureId
    #[arg(long)]
    pub feature_id: Option<String>,
    /// repositoryId
    #[arg(long)]
    pub repository_id: Option<String>,
    /// createdByTeamMemberId
    #[arg(long)]
    pub team_member_id: Option<String>,
    /// maxIterations (ralph: 1-100, default 10)
    #[arg(long)]
    pub max_iterations: Option<u32>,
    /// completionPromise (ralph: default RALPH_COMPLETE)
    #[arg(long)]
    pub completion_promise: Option<String>,
    /// feedbackCommands (ralph; repeat the flag for several)
    #[arg(long = "feedback-command", value_name = "COMMAND")]
    pub feedback_commands: Vec<String>,
    /// priority: -100 to 100, higher runs first (default 0)
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// timeoutSeconds: the job's wall-clock limit once running, 1-86400 (the runner's RUNNER_JOB_TIMEOUT caps it)
    #[arg(long = "timeout", value_name = "SECONDS")]
    pub timeout_seconds: Option<u32>,
    /// Follow the job right after submitting it (exit status as for `kiln follow`).
    #[arg(long, short = 'F')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct FollowArgs {
    /// The job's id.
    pub id: String,
    /// Give up after the server has been unreachable this many seconds in a row.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub give_up_after: u64,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only these statuses (comma-separated or repeated): queued, running, completed, failed, cancelled.
    #[arg(long, short = 's', value_delimiter = ',')]
    pub status: Vec<String>,
    /// At most this many jobs (1-500).
    #[arg(long, short = 'n', default_value_t = 20)]
    pub limit: u32,
    /// Skip this many jobs.
    #[arg(long, default_value_t = 0)]
    pub offset: u32,
    /// Only jobs of this client.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Only jobs of this feature.
    #[arg(long)]
    pub feature_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct JobId {
    /// The job's id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job's id.
    pub id: String,
    /// Messages fetched per request (the edge answers at most 4999).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=4999))]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct MessageArgs {
    /// The job's id.
    pub id: String,
    /// The message (`-` reads it from stdin).
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_flags_parse() {
        let cli = parse(&[
            "submit", "--type", "ralph", "--org", "acme", "--repo", "shop", "-p", "go", "--feedback-command", "make test",
            "--feedback-command", "make lint", "--priority", "-5", "--max-iterations", "3", "--follow", "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Submit(s) = cli.command else { panic!("not submit") };
        assert_eq!(s.job_type, Some(TypeArg::Ralph));
        assert_eq!(s.feedback_commands, vec!["make test", "make lint"]);
        assert_eq!((s.priority, s.max_iterations, s.follow), (Some(-5), Some(3), true));
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(parse(&["submit", "--type", "deploy"]).is_err());
        assert!(parse(&["submit", "--prompt", "x", "--prompt-file", "p.txt"]).is_err());
        assert!(parse(&["login", "--password", "x", "--password-stdin"]).is_err());
        assert!(parse(&["follow"]).is_err());
        assert!(parse(&["ls", "--limit", "many"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn ls_statuses_split_on_commas() {
        let Command::Ls(ls) = parse(&["ls", "--status", "queued,running", "-s", "failed"]).unwrap().command else {
            panic!("not ls")
        };
        assert_eq!(ls.status, vec!["queued", "running", "failed"]);
        assert_eq!(ls.limit, 20);
    }

    #[test]
    fn aliases() {
        assert!(matches!(parse(&["health"]).unwrap().command, Command::Status));
        assert!(matches!(parse(&["list"]).unwrap().command, Command::Ls(_)));
    }
}
