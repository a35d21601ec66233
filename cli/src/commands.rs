//! What each command does: resolve the server and credential, call the REST API, print text or
//! JSON, and answer the exit status.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use kiln_schemas::auth::{LoginRequest, RegisterRequest, TokenPair};
use kiln_schemas::jobs::{CreateJobResponse, Health, IterationList, JobList, JobView, MAX_LIST_LIMIT};
use kiln_schemas::status::JobStatus;
use reqwest::Method;
use serde_json::{json, Value};

use crate::args::{Cli, Command, Credentials, FollowArgs, LsArgs, SubmitArgs};
use crate::client::{job_path, Auth, Client};
use crate::config::{config_path, resolve_url, ConfigFile, HostEntry};
use crate::follow::{exit_code, follow, Output};
use crate::input;
use crate::render::{self, color_enabled, Palette};

/// Everything a command needs to know about where it runs.
struct Ctx {
    url: String,
    json: bool,
    palette: Palette,
    stdout_tty: bool,
    config_path: Option<PathBuf>,
    file: ConfigFile,
    env_token: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Ctx {
    fn from_env(cli: &Cli) -> anyhow::Result<Ctx> {
        let config_path = config_path(env);
        let file = match &config_path {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let url = resolve_url(cli.url.as_deref(), env("KILN_URL").as_deref(), &file)?;
        let stdout_tty = std::io::stdout().is_terminal();
        let no_color = std::env::var("NO_COLOR").ok();
        Ok(Ctx {
            url,
            json: cli.json,
            palette: Palette { color: color_enabled(stdout_tty, no_color.as_deref()) },
            stdout_tty,
            config_path,
            file,
            env_token: env("KILN_TOKEN"),
        })
    }

    /// A client with the credential: `KILN_TOKEN`, else the saved tokens for this server.
    fn client(&self) -> anyhow::Result<Client> {
        let auth = if let Some(t) = &self.env_token {
            Auth::Fixed(t.clone())
        } else if let (Some(entry), Some(path)) = (self.file.hosts.get(&self.url), &self.config_path) {
            Auth::Saved { entry: entry.clone(), path: path.clone() }
        } else {
            Auth::None
        };
        Client::new(&self.url, auth)
    }

    fn print_json(&self, v: &Value) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
    }

    /// Prints a server answer: as it came in JSON mode, else read as `T` and rendered as text.
    fn show<T: serde::de::DeserializeOwned>(&self, v: Value, what: &str, text: impl Fn(&T) -> String) -> anyhow::Result<i32> {
        if self.json {
            self.print_json(&v);
        } else {
            let value: T = serde_json::from_value(v).with_context(|| format!("reading {what}"))?;
            print!("{}", text(&value));
        }
        Ok(0)
    }
}

/// Runs the command; answers the process's exit status.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let ctx = Ctx::from_env(&cli)?;
    match cli.command {
        Command::Login(c) => login(&ctx, c, false).await,
        Command::Register(c) => login(&ctx, c, true).await,
        Command::Logout => logout(&ctx),
        Command::Submit(s) => submit(&ctx, *s).await,
        Command::Follow(f) => follow_job(&ctx, f).await,
        Command::Ls(l) => ls(&ctx, l).await,
        Command::Show(j) => {
            let v = ctx.client()?.call(Method::GET, &job_path(&j.id, ""), None).await?;
            ctx.show(v, "the job", |job: &JobView| render::job_details(job, ctx.palette))
        }
        Command::Cancel(j) => {
            let v = post(&ctx, &j.id, "/cancel", None).await?;
            if !ctx.json {
                let was = if v["wasRunning"] == true { " (it was running)" } else { "" };
                println!("cancelled job {}{was}", j.id);
            }
            Ok(0)
        }
        Command::Stop(j) => {
            let v = post(&ctx, &j.id, "/stop", None).await?;
            if !ctx.json {
                println!("{}", v["message"].as_str().unwrap_or("stop requested"));
            }
            Ok(0)
        }
        Command::Complete(j) => {
            post(&ctx, &j.id, "/complete", None).await?;
            if !ctx.json {
                println!("job {} is completing: it completes once the agent has answered", j.id);
            }
            Ok(0)
        }
        Command::Retry(j) => {
            let v = post(&ctx, &j.id, "/retry", None).await?;
            if !ctx.json {
                println!("{}", v["id"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Command::Message(m) => {
            let text = if m.text == "-" { input::all_of_stdin()? } else { m.text.clone() };
            if text.trim().is_empty() {
                bail!("the message is empty");
            }
            post(&ctx, &m.id, "/message", Some(json!({ "message": text }))).await?;
            if !ctx.json {
                println!("message sent to job {}", m.id);
            }
            Ok(0)
        }
        Command::Logs(j) => {
            // The edge answers a page of the log at a time; follow `messages_next_after` to its end.
            let mut client = ctx.client()?;
            let (mut messages, mut after) = (Vec::new(), None);
            loop {
                let mut query = format!("?includeMessages=true&messagesLimit={}", j.page_size);
                if let Some(seq) = after {
                    query.push_str(&format!("&messagesAfter={seq}"));
                }
                let v = client.call(Method::GET, &job_path(&j.id, &query), None).await?;
                let job: JobView = serde_json::from_value(v).context("reading the job")?;
                messages.extend(job.messages.unwrap_or_default());
                match job.messages_next_after {
                    Some(next) if Some(next) != after => after = Some(next),
                    _ => break,
                }
            }
            if ctx.json {
                ctx.print_json(&serde_json::to_value(&messages)?);
            } else {
                for l in render::message_lines(&messages, ctx.palette) {
                    println!("{l}");
                }
            }
            Ok(0)
        }
        Command::Iterations(j) => {
            let v = ctx.client()?.call(Method::GET, &job_path(&j.id, "/iterations"), None).await?;
            ctx.show(v, "the iterations", |list: &IterationList| render::iterations_text(list, ctx.palette))
        }
        Command::Status => {
            let v = ctx.client()?.public(Method::GET, "/health", None).await?;
            ctx.show(v, "/health", |h: &Health| render::health_text(h, &ctx.url, ctx.palette))
        }
    }
}

/// `POST /jobs/:id<suffix>`; prints the answer in JSON mode.
async fn post(ctx: &Ctx, id: &str, suffix: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let body = body.unwrap_or_else(|| json!({}));
    let v = ctx.client()?.call(Method::POST, &job_path(id, suffix), Some(&body)).await?;
    if ctx.json {
        ctx.print_json(&v);
    }
    Ok(v)
}

async fn login(ctx: &Ctx, c: Credentials, register: bool) -> anyhow::Result<i32> {
    let Some(path) = &ctx.config_path else {
        bail!("nowhere to save the login: set KILN_CONFIG, XDG_CONFIG_HOME or HOME");
    };
    let email = match c.email {
        Some(e) => e,
        None => input::ask("Email: ")?,
    };
    if email.trim().is_empty() {
        bail!("an email is required");
    }
    let password = match (c.password, c.password_stdin) {
        (Some(p), _) => p,
        (None, true) => input::first_line_of_stdin()?,
        (None, false) => input::ask_password("Password: ")?,
    };
    if password.is_empty() {
        bail!("a password is required");
    }
    let client = Client::new(&ctx.url, Auth::None)?;
    if register {
        let body = serde_json::to_value(RegisterRequest { email: email.clone(), password: password.clone(), username: None, name: None })?;
        client.public(Method::POST, "/api/auth/register/", Some(&body)).await?;
    }
    let body = serde_json::to_value(LoginRequest { email: email.clone(), password })?;
    let pair: TokenPair = serde_json::from_value(client.public(Method::POST, "/api/auth/login/", Some(&body)).await?)
        .context("reading the login answer")?;
    let mut file = ConfigFile::load(path)?;
    file.hosts.insert(ctx.url.clone(), HostEntry { email: Some(email.trim().to_string()), access: pair.access, refresh: pair.refresh });
    file.url = Some(ctx.url.clone());
    file.save(path)?;
    if ctx.json {
        ctx.print_json(&json!({"url": ctx.url, "email": email.trim(), "registered": register, "config": path}));
    } else {
        let verb = if register { "Registered and logged in" } else { "Logged in" };
        println!("{verb} to {} as {}", ctx.url, email.trim());
    }
    if ctx.env_token.is_some() {
        eprintln!("kiln: note: KILN_TOKEN is set and is used instead of this login until it is unset");
    }
    Ok(0)
}

fn logout(ctx: &Ctx) -> anyhow::Result<i32> {
    let Some(path) = &ctx.config_path else { bail!("no config file: set KILN_CONFIG, XDG_CONFIG_HOME or HOME") };
    let mut file = ConfigFile::load(path)?;
    let was = file.hosts.remove(&ctx.url).is_some();
    if file.url.as_deref() == Some(ctx.url.as_str()) {
        file.url = None;
    }
    file.save(path)?;
    if ctx.json {
        ctx.print_json(&json!({"url": ctx.url, "loggedOut": was}));
    } else if was {
        println!("Logged out of {}", ctx.url);
    } else {
        println!("Not logged in to {}", ctx.url);
    }
    Ok(0)
}

async fn submit(ctx: &Ctx, s: SubmitArgs) -> anyhow::Result<i32> {
    let stdin_users = [s.file.as_deref() == Some(std::path::Path::new("-")), s.prompt.as_deref() == Some("-"), s.prompt_file.as_deref() == Some(std::path::Path::new("-"))];
    if stdin_users.iter().filter(|u| **u).count() > 1 {
        bail!("only one of --file, --prompt and --prompt-file can read stdin");
    }
    let file = match &s.file {
        Some(p) => {
            let text = input::text_of(p)?;
            Some(serde_json::from_str::<Value>(&text).with_context(|| format!("{} is not JSON", p.display()))?)
        }
        None => None,
    };
    let prompt = match (&s.prompt, &s.prompt_file) {
        (Some(p), _) if p == "-" => Some(input::all_of_stdin()?),
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(input::text_of(f)?),
        (None, None) => None,
    };
    let body = crate::submit::build_body(file, &s, prompt)?;
    let mut client = ctx.client()?;
    let v = client.call(Method::POST, "/jobs", Some(&body)).await?;
    let created: CreateJobResponse = serde_json::from_value(v.clone()).context("reading the created job")?;
    if ctx.json {
        if s.follow {
            println!("{v}");
        } else {
            ctx.print_json(&v);
        }
    } else if s.follow {
        println!(
            "{} job {} queued at position {} on branch {}",
            ctx.palette.bold("submitted"),
            created.id,
            created.position,
            render::sanitize(&created.branch_name)
        );
    } else {
        // Only the id on stdout, for `id=$(kiln submit ...)`; the rest for the person.
        println!("{}", created.id);
        eprintln!("queued at position {} on branch {}; follow it with `kiln follow {}`", created.position, render::sanitize(&created.branch_name), created.id);
    }
    if !s.follow {
        return Ok(0);
    }
    follow_until_interrupted(ctx, &mut client, &created.id, Duration::from_secs(300)).await
}

async fn follow_job(ctx: &Ctx, f: FollowArgs) -> anyhow::Result<i32> {
    let mut client = ctx.client()?;
    follow_until_interrupted(ctx, &mut client, &f.id, Duration::from_secs(f.give_up_after)).await
}

/// Follows the job; Ctrl-C stops following (exit status 130) and leaves the job running.
async fn follow_until_interrupted(ctx: &Ctx, client: &mut Client, id: &str, give_up_after: Duration) -> anyhow::Result<i32> {
    let mut out = Output::new(ctx.json, ctx.palette, ctx.stdout_tty);
    let ended = tokio::select! {
        end = follow(client, id, &mut out, give_up_after) => Some(end),
        _ = tokio::signal::ctrl_c() => None,
    };
    match ended {
        Some(end) => Ok(exit_code(end?)),
        None => {
            out.interrupted();
            eprintln!("kiln: stopped following job {id}; the job goes on (`kiln follow {id}` picks it up again)");
            Ok(130)
        }
    }
}

async fn ls(ctx: &Ctx, l: LsArgs) -> anyhow::Result<i32> {
    for s in &l.status {
        if JobStatus::parse(s.trim()).is_none() {
            let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
            bail!("unknown status {s:?} (--status takes {})", all.join(", "));
        }
    }
    if !(1..=MAX_LIST_LIMIT).contains(&l.limit) {
        bail!("--limit must be from 1 to {MAX_LIST_LIMIT}");
    }
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if !l.status.is_empty() {
        q.append_pair("status", &l.status.join(","));
    }
    q.append_pair("limit", &l.limit.to_string());
    if l.offset > 0 {
        q.append_pair("offset", &l.offset.to_string());
    }
    if let Some(c) = &l.client_id {
        q.append_pair("clientId", c);
    }
    if let Some(f) = &l.feature_id {
        q.append_pair("featureId", f);
    }
    let v = ctx.client()?.call(Method::GET, &format!("/jobs?{}", q.finish()), None).await?;
    ctx.show(v, "the job list", |list: &JobList| render::jobs_table(&list.jobs, list.total, ctx.palette))
}
