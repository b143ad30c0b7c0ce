//! The `bakery` binary: parses the command line, sets up logging, runs one command and maps
//! its result to an exit code. Errors are printed once, with their whole chain.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use bakery::cli::{Cli, Command};
use bakery::output::{Event, Format, Reporter};
use bakery::{aws, bake, recipe, rollout};

/// Exit codes, documented in the README.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CLEANUP_INCOMPLETE: u8 = 5;
    pub const AUDIT_HIGH: u8 = 8;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = match &cli.command {
        Command::Daemon(d) => match d.log_format.as_deref() {
            Some(f) => f == "json",
            None => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        },
        _ => false,
    };
    let daemon = matches!(cli.command, Command::Daemon(_));
    init_logging(
        cli.global.verbose + u8::from(daemon),
        cli.global.quiet,
        json_logs,
    );
    if daemon {
        bakery::health::malloc::use_one_arena();
    }
    // A release runs its groups' rollouts on worker threads; a rollout's future is deep (more
    // so unoptimized), so workers get the main thread's 8 MiB of stack, not tokio's 2 MiB
    // (virtual: only the pages touched are resident).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    runtime.block_on(run(cli))
}

fn init_logging(verbose: u8, quiet: bool, json: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        (_, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{default},aws_config=warn,aws_smithy_runtime=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn target(g: &bakery::cli::Global) -> aws::Target {
    aws::Target {
        region: g.region.clone(),
        profile: g.profile.clone(),
        endpoint_url: g.endpoint_url.clone(),
    }
}

/// A command that failed: its message (with the whole chain) and exit code.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn new(message: impl std::fmt::Display, code: u8) -> Self {
        Self {
            message: message.to_string(),
            code,
        }
    }
}

type Done = Result<u8, Failure>;

/// Runs one command: each has its own function; they report through the reporter.
async fn run(cli: Cli) -> ExitCode {
    let reporter = if cli.global.no_progress {
        Reporter::without_progress(cli.global.output, cli.global.quiet)
    } else {
        Reporter::new(cli.global.output, cli.global.quiet)
    };
    let target = target(&cli.global);
    let (name, done) = match cli.command {
        Command::Validate(args) => ("validate", validate(&reporter, args)),
        Command::Build(args) => return build(&reporter, &target, args).await,
        Command::Promote(args) => ("promote", promote(&reporter, &target, args).await),
        Command::Rollout(args) => return rollout_cmd(&reporter, &target, args).await,
        Command::Release(args) => return release(&reporter, &target, args).await,
        Command::Daemon(args) => ("daemon", daemon(&reporter, &target, args).await),
        Command::Gc(args) => ("gc", gc(&reporter, &target, args).await),
        Command::Prune(args) => ("prune", prune(&reporter, &target, args).await),
        Command::Audit(args) => ("audit", audit(&reporter, &target, args).await),
        Command::Status(args) => ("status", status(&reporter, &target, args).await),
        Command::Init(args) => ("init", init(&reporter, &target, args).await),
    };
    match done {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            reporter.emit(Event::CommandFailed {
                command: name.into(),
                error: f.message,
                exit_code: f.code.into(),
            });
            ExitCode::from(f.code)
        }
    }
}

async fn connect(target: &aws::Target) -> Result<aws::Aws, Failure> {
    aws::Aws::connect(target)
        .await
        .map_err(|e| Failure::new(e, exit::USAGE))
}

/// A client in the region of `target` and in each of `others` (`--regions`), home first.
async fn connect_regions(
    target: &aws::Target,
    others: &[String],
) -> Result<Vec<(String, aws::Aws)>, Failure> {
    let home = connect(target).await?;
    let mut out = vec![(home.region.clone(), home)];
    for region in others {
        if let Err(p) = recipe::distribute::check_region(region) {
            return Err(Failure::new(
                format!("--regions: {} ({})", p.message, p.hint),
                exit::USAGE,
            ));
        }
        if out.iter().any(|(r, _)| r == region) {
            continue;
        }
        let t = aws::Target {
            region: Some(region.clone()),
            ..target.clone()
        };
        out.push((region.clone(), connect(&t).await?));
    }
    Ok(out)
}

fn validate(reporter: &Reporter, args: bakery::cli::RecipeArgs) -> Done {
    let sources = recipe::VarSources::from_env(args.var_files, args.vars);
    let r = recipe::load(&args.recipe, &sources).map_err(|e| Failure::new(e, exit::USAGE))?;
    reporter.result(
        Event::Valid {
            file: r.path.display().to_string(),
            sha256: Some(r.sha256.clone()),
        },
        || format!("{}: valid", args.recipe.display()),
    );
    Ok(0)
}

async fn build(
    reporter: &Reporter,
    target: &aws::Target,
    args: bakery::cli::BuildArgs,
) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display, code: u8| build_failed(reporter, e, code);
    let sources = recipe::VarSources::from_env(args.recipe.var_files, args.recipe.vars);
    let recipe = match recipe::load(&args.recipe.recipe, &sources) {
        Ok(r) => r,
        Err(e) => return fail(&e, exit::USAGE),
    };
    if let Err(e) = bake::manifest::Manifest::check_writable(&args.manifest) {
        return fail(&e, exit::USAGE);
    }
    let aws = match aws::Aws::connect(target).await {
        Ok(a) => a,
        Err(e) => return fail(&e, exit::USAGE),
    };
    // Where the image goes is checked before anything is made (an opt-in region, ...).
    let clients = match &recipe.distribute {
        Some(d) => match bakery::promote::connect(target, &aws.region, d).await {
            Ok(c) => Some(c),
            Err(e) => return fail(&e, u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE)),
        },
        None => None,
    };
    if let Some(build_id) = &args.resume {
        let (Some(clients), Some(d)) = (&clients, &recipe.distribute) else {
            return fail(
                &format!("--resume {build_id}: the recipe has no [distribute] table, so a complete bake has nothing left to do"),
                exit::USAGE,
            );
        };
        return resume_build(reporter, &aws, clients, d, &args.manifest, build_id).await;
    }
    let opts = bake::Options {
        on_error: args.on_error,
        trust_host_key_on_first_use: args.trust_host_key_on_first_use,
        manifest_path: Some(args.manifest.clone()),
        image_ready: None,
    };
    let (Some(clients), Some(d)) = (&clients, &recipe.distribute) else {
        return finish_build(reporter, bake::run(&aws, &recipe, &opts, reporter).await);
    };
    // Baked and promoted where `[distribute]` says. A failed promotion leaves the image
    // complete (continue with --resume BUILD_ID) and no copy.
    let (outcome, promotion) =
        bakery::promote::with_bake(&aws, &recipe, opts, clients, d, reporter).await;
    if let (Ok(manifest), Some(e)) = (&outcome.result, promotion) {
        let code = u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE);
        let message = format!(
            "{e}\n  the image {} of build {} is complete; after fixing the cause, \
             continue with: bakery build {} --resume {} --manifest {}",
            manifest.ami_id,
            manifest.build_id,
            args.recipe.recipe.display(),
            manifest.build_id,
            args.manifest.display()
        );
        return fail(&message, code);
    }
    finish_build(reporter, outcome)
}

/// Reports a build that failed before (or instead of) a bake: the event, and the error on
/// stderr for a human.
fn build_failed(reporter: &Reporter, e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    reporter.emit(Event::BuildFailed {
        error: e.to_string(),
        exit_code: code.into(),
    });
    if reporter.format() == Format::Human {
        eprintln!("error: {e}");
    }
    ExitCode::from(code)
}

/// `bakery build --resume BUILD_ID`: the bake is complete; only its promotion is left.
async fn resume_build(
    reporter: &Reporter,
    aws: &aws::Aws,
    clients: &bakery::promote::Clients,
    d: &recipe::distribute::Distribute,
    manifest_path: &std::path::Path,
    build_id: &str,
) -> ExitCode {
    let manifest = match bakery::promote::resume_manifest(aws, manifest_path, build_id).await {
        Ok(m) => m,
        Err(e) => {
            let code = u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE);
            return build_failed(reporter, &e, code);
        }
    };
    match bakery::promote::run(clients, &manifest, manifest_path, d, reporter).await {
        Ok(m) => {
            reporter.emit(Event::BuildFinished {
                manifest: serde_json::to_value(&m).unwrap_or_default(),
            });
            ExitCode::SUCCESS
        }
        Err(e) => build_failed(
            reporter,
            &e,
            u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE),
        ),
    }
}

async fn promote(
    reporter: &Reporter,
    target: &aws::Target,
    args: bakery::cli::PromoteArgs,
) -> Done {
    let manifest =
        bake::manifest::Manifest::read(&args.manifest).map_err(|e| Failure::new(e, exit::USAGE))?;
    // No settings given: a rerun resumes with the settings its journal recorded.
    let settings = match bakery::promote::read_journal(&args.manifest, &manifest.build_id) {
        Some(j) if args.no_settings() => j.settings,
        _ => args.flags().validate().map_err(|errors| {
            Failure::new(
                format!(
                    "bakery promote has {} error(s):\n{}",
                    errors.len(),
                    errors.join("\n")
                ),
                exit::USAGE,
            )
        })?,
    };
    let clients = bakery::promote::connect(target, &manifest.region, &settings)
        .await
        .map_err(|e| Failure::new(&e, u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE)))?;
    bakery::promote::run(&clients, &manifest, &args.manifest, &settings, reporter)
        .await
        .map_err(|e| Failure::new(&e, u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE)))?;
    Ok(0)
}

async fn rollout_cmd(
    reporter: &Reporter,
    target: &aws::Target,
    args: bakery::cli::RolloutArgs,
) -> ExitCode {
    let fail = |message: &str, code: i32| {
        reporter.emit(Event::RolloutFailed {
            error: message.to_string(),
            exit_code: code,
        });
        if reporter.format() == Format::Human {
            eprintln!("error: {message}");
        }
        ExitCode::from(u8::try_from(code).unwrap_or(exit::FAILURE))
    };
    let ami =
        match (args.ami, args.manifest, args.ami_param) {
            (Some(id), _, _) => Some(rollout::AmiSource::Id(id)),
            (_, Some(m), _) => Some(rollout::AmiSource::Manifest(m)),
            (_, _, Some(p)) => Some(rollout::AmiSource::Param(p)),
            _ if args.abort => None,
            _ => return fail(
                "name the AMI to roll out: --ami AMI_ID, --manifest FILE or --ami-param SSM_PATH",
                exit::USAGE.into(),
            ),
        };
    let req = rollout::Request {
        group: args.asg,
        ami,
        max_surge: args.max_surge,
        max_unavailable: args.max_unavailable,
        canary: args.canary,
        canary_bake: args.canary_bake,
        health_timeout: args.health_timeout,
        warmup: args.warmup,
        rollback: !args.no_rollback,
        dry_run: args.dry_run,
        abort: args.abort,
        force: args.force,
        keep_versions: args.keep_versions,
        lock_ttl: args.lock_ttl,
        lease_table: args.lease_table,
        in_group: rollout::InGroup {
            skip_matching: !args.no_skip_matching,
            protected_instances: args.protected_instances,
            standby_instances: args.standby_instances,
            checkpoints: args.checkpoints.unwrap_or_default(),
            checkpoint_pause: args.checkpoint_pause,
            ramp: args.ramp,
        },
    };
    let aws = match aws::Aws::connect(target).await {
        Ok(a) => a,
        Err(e) => return fail(&e.to_string(), exit::USAGE.into()),
    };
    match rollout::run(&aws, &req, reporter).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

async fn release(
    reporter: &Reporter,
    target: &aws::Target,
    args: bakery::cli::ReleaseArgs,
) -> ExitCode {
    let opts = bakery::release::Options {
        plan: args.plan,
        status: args.status,
        abort: args.abort,
        dry_run: args.dry_run,
        restart: args.restart,
        lock_ttl: args.lock_ttl,
        lease_table: args.lease_table,
    };
    match bakery::release::run(target, &opts, reporter).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            reporter.emit(Event::ReleaseFailed {
                error: e.to_string(),
                exit_code: code,
            });
            if reporter.format() == Format::Human {
                eprintln!("error: {e}");
            }
            ExitCode::from(u8::try_from(code).unwrap_or(exit::FAILURE))
        }
    }
}

async fn daemon(reporter: &Reporter, target: &aws::Target, args: bakery::cli::DaemonArgs) -> Done {
    // The configuration is checked before anything else, AWS included.
    let config =
        bakery::health::config::load(&args.config).map_err(|e| Failure::new(e, exit::USAGE))?;
    if args.check {
        // Whether `interval` x `[api] rate` covers a round's calls (the daemon's own estimate).
        for note in bakery::health::check_notes(&config) {
            eprintln!("{note}");
        }
        reporter.result(
            Event::Valid {
                file: args.config.display().to_string(),
                sha256: None,
            },
            || format!("{}: valid", args.config.display()),
        );
        return Ok(0);
    }
    let aws = connect(target).await?;
    bakery::health::run(aws, config)
        .await
        .map_err(|e| Failure::new(e, exit::USAGE))?;
    Ok(0)
}

async fn gc(reporter: &Reporter, target: &aws::Target, args: bakery::cli::GcArgs) -> Done {
    let regions = connect_regions(target, &args.regions).await?;
    let findings = bakery::gc::run_regions(
        target,
        &regions,
        args.older_than,
        args.dry_run,
        args.build_id,
    )
    .await
    .map_err(|e| Failure::new(e, exit::FAILURE))?;
    reporter.result(
        Event::Gc {
            dry_run: args.dry_run,
            findings: serde_json::to_value(&findings).unwrap_or_default(),
        },
        || bakery::gc::render_regions(&findings, regions.len()),
    );
    let failed = findings
        .iter()
        .filter(|f| f.finding.action.failed())
        .count();
    if failed > 0 {
        return Err(Failure::new(
            format!("{failed} leftover(s) could not be removed (see the table)"),
            exit::FAILURE,
        ));
    }
    Ok(0)
}

async fn prune(reporter: &Reporter, target: &aws::Target, args: bakery::cli::PruneArgs) -> Done {
    if args.name_prefix.trim().len() < 3 {
        return Err(Failure::new(
            "--name-prefix must have at least 3 characters, so a typo cannot match every AMI",
            exit::USAGE,
        ));
    }
    let regions = connect_regions(target, &args.regions).await?;
    let rows = bakery::prune::run(
        &regions,
        &args.name_prefix,
        args.keep,
        args.dry_run,
        args.force,
    )
    .await
    .map_err(|e| Failure::new(e, exit::FAILURE))?;
    reporter.result(
        Event::Prune {
            dry_run: args.dry_run,
            images: serde_json::to_value(&rows).unwrap_or_default(),
        },
        || bakery::prune::render(&rows, &args.name_prefix),
    );
    let failed = rows.iter().filter(|r| r.action.failed()).count();
    if failed > 0 {
        return Err(Failure::new(
            format!("{failed} image(s) could not be deregistered (see the list)"),
            exit::FAILURE,
        ));
    }
    Ok(0)
}

async fn audit(reporter: &Reporter, target: &aws::Target, args: bakery::cli::AuditArgs) -> Done {
    let aws = connect(target).await?;
    let findings = bakery::audit::run(
        &aws,
        &args.asg,
        args.db_instance.as_deref(),
        args.secret.as_deref(),
    )
    .await
    .map_err(|e| match e {
        bakery::audit::AuditError::GroupNotFound(_) => Failure::new(e, exit::USAGE),
        e => Failure::new(e, exit::FAILURE),
    })?;
    let high = findings
        .iter()
        .filter(|f| !f.passed && f.severity == bakery::audit::Severity::High)
        .count();
    reporter.result(
        Event::Audit {
            group: args.asg.clone(),
            high_findings: high,
            findings: serde_json::to_value(&findings).unwrap_or_default(),
        },
        || bakery::audit::render(&findings),
    );
    if high > 0 {
        if reporter.format() == Format::Human {
            eprintln!("error: {high} high-severity finding(s)");
        }
        return Ok(exit::AUDIT_HIGH);
    }
    Ok(0)
}

async fn status(reporter: &Reporter, target: &aws::Target, args: bakery::cli::StatusArgs) -> Done {
    let aws = connect(target).await?;
    let s = rollout::status::status(&aws, &args.asg)
        .await
        .map_err(|e| Failure::new(&e, u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE)))?;
    reporter.result(
        Event::Status {
            status: serde_json::to_value(&s).unwrap_or_default(),
        },
        || rollout::status::render(&s),
    );
    Ok(0)
}

async fn init(reporter: &Reporter, target: &aws::Target, args: bakery::cli::InitArgs) -> Done {
    let aws = connect(target).await?;
    let done = bakery::lease::Store::init(&aws, &args.lease_table)
        .await
        .map_err(|e| {
            let code = if e.is_usage() {
                exit::USAGE
            } else {
                exit::FAILURE
            };
            Failure::new(e, code)
        })?;
    reporter.result(
        Event::Status {
            status: serde_json::json!({ "lease_table": &done }),
        },
        || {
            let what = match (done.created, done.ttl_enabled) {
                (true, _) => "created (partition key `pk` string, on demand, TTL on `ttl`)",
                (false, true) => "existed with the right schema; turned TTL on (`ttl`)",
                (false, false) => "exists with the right schema; nothing to do",
            };
            format!("lease table {} in {}: {what}", done.table, done.region)
        },
    );
    Ok(0)
}

fn finish_build(reporter: &Reporter, outcome: bake::Outcome) -> ExitCode {
    let human = reporter.format() == Format::Human;
    let mut code = match &outcome.result {
        Ok(manifest) => {
            let value = serde_json::to_value(manifest).unwrap_or_default();
            let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
            reporter.result(Event::BuildFinished { manifest: value }, || pretty);
            if human {
                eprintln!(
                    "==> {} ({}) ready in {:.1}s",
                    manifest.ami_id, manifest.ami_name, manifest.duration_s
                );
            }
            0
        }
        Err(e) => {
            if human {
                // The original error first; cleanup problems follow.
                eprintln!("error: {}", outcome.redactor.redact(&e.to_string()));
            }
            e.exit_code()
        }
    };
    if !outcome.cleanup_failures.is_empty() || !outcome.left_behind.is_empty() {
        if human {
            for f in &outcome.cleanup_failures {
                eprintln!(
                    "error: cleanup: could not remove {} {}: {}",
                    f.kind, f.id, f.error
                );
            }
            if !outcome.left_behind.is_empty() {
                eprintln!(
                    "warning: {} temporary resource(s) left behind; the commands above remove them",
                    outcome.left_behind.len()
                );
            }
        }
        if code == 0 {
            code = exit::CLEANUP_INCOMPLETE.into();
        }
    }
    ExitCode::from(u8::try_from(code).unwrap_or(exit::FAILURE))
}
