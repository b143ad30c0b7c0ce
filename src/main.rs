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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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

fn report_error(reporter: &Reporter, message: &str, code: u8) -> ExitCode {
    match reporter.format() {
        Format::Json => reporter.emit(Event::BuildFailed {
            error: message.to_string(),
            exit_code: code.into(),
        }),
        Format::Human => eprintln!("error: {message}"),
    }
    ExitCode::from(code)
}

fn target(g: &bakery::cli::Global) -> aws::Target {
    aws::Target {
        region: g.region.clone(),
        profile: g.profile.clone(),
        endpoint_url: g.endpoint_url.clone(),
    }
}

async fn run(cli: Cli) -> ExitCode {
    let reporter = Reporter::new(cli.global.output, cli.global.quiet);
    let target = target(&cli.global);
    match cli.command {
        Command::Validate(args) => {
            let sources = recipe::VarSources::from_env(args.var_files, args.vars);
            match recipe::load(&args.recipe, &sources) {
                Ok(r) => {
                    if reporter.format() == Format::Json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "valid", "recipe": r.path, "sha256": r.sha256})
                        );
                    } else {
                        println!("{}: valid", args.recipe.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report_error(&reporter, &e.to_string(), exit::USAGE),
            }
        }
        Command::Build(args) => {
            let sources = recipe::VarSources::from_env(args.recipe.var_files, args.recipe.vars);
            let recipe = match recipe::load(&args.recipe.recipe, &sources) {
                Ok(r) => r,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            let opts = bake::Options {
                on_error: args.on_error,
                trust_host_key_on_first_use: args.trust_host_key_on_first_use,
                manifest_path: Some(args.manifest),
            };
            let outcome = bake::run(&aws, &recipe, &opts, &reporter).await;
            finish_build(&reporter, outcome)
        }
        Command::Rollout(args) => {
            let ami = match (args.ami, args.manifest, args.ami_param) {
                (Some(id), _, _) => Some(rollout::AmiSource::Id(id)),
                (_, Some(m), _) => Some(rollout::AmiSource::Manifest(m)),
                (_, _, Some(p)) => Some(rollout::AmiSource::Param(p)),
                _ if args.abort => None,
                _ => {
                    return report_rollout_error(
                        &reporter,
                        "name the AMI to roll out: --ami AMI_ID, --manifest FILE or --ami-param SSM_PATH",
                        exit::USAGE.into(),
                    )
                }
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
            };
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => {
                    return report_rollout_error(&reporter, &e.to_string(), exit::USAGE.into())
                }
            };
            match rollout::run(&aws, &req, &reporter).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => report_rollout_error(&reporter, &format!("{e}"), e.exit_code()),
            }
        }
        Command::Daemon(args) => {
            // The configuration is checked before anything else, AWS included.
            let config = match bakery::health::config::load(&args.config) {
                Ok(c) => c,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            if args.check {
                println!("{}: valid", args.config.display());
                return ExitCode::SUCCESS;
            }
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            match bakery::health::run(aws, config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report_error(&reporter, &e.to_string(), exit::USAGE),
            }
        }
        Command::Gc(args) => {
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            match bakery::gc::run(&aws, args.older_than, args.dry_run, args.build_id).await {
                Ok(findings) => {
                    if reporter.format() == Format::Json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "gc", "dry_run": args.dry_run, "findings": findings})
                        );
                    } else {
                        print!("{}", bakery::gc::render(&findings));
                    }
                    if findings.iter().any(|f| f.action.starts_with("failed")) {
                        ExitCode::from(exit::FAILURE)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => report_error(&reporter, &e.to_string(), exit::FAILURE),
            }
        }
        Command::Prune(args) => {
            if args.name_prefix.trim().len() < 3 {
                return report_error(&reporter, "--name-prefix must have at least 3 characters, so a typo cannot match every AMI", exit::USAGE);
            }
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            match bakery::prune::run(&aws, &args.name_prefix, args.keep, args.dry_run).await {
                Ok(rows) => {
                    if reporter.format() == Format::Json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "prune", "dry_run": args.dry_run, "images": rows})
                        );
                    } else if rows.is_empty() {
                        println!("no AMI named {}*", args.name_prefix);
                    } else {
                        for r in &rows {
                            println!("{}  {}  {}  {}", r.ami_id, r.name, r.created, r.action);
                        }
                    }
                    if rows.iter().any(|r| r.action.starts_with("failed")) {
                        ExitCode::from(exit::FAILURE)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => report_error(&reporter, &e.to_string(), exit::FAILURE),
            }
        }
        Command::Audit(args) => {
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            match bakery::audit::run(
                &aws,
                &args.asg,
                args.db_instance.as_deref(),
                args.secret.as_deref(),
            )
            .await
            {
                Ok(findings) => {
                    let high = findings
                        .iter()
                        .filter(|f| !f.passed && f.severity == bakery::audit::Severity::High)
                        .count();
                    if reporter.format() == Format::Json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "audit", "group": args.asg, "high_findings": high, "findings": findings})
                        );
                    } else {
                        print!("{}", bakery::audit::render(&findings));
                    }
                    if high > 0 {
                        if reporter.format() == Format::Human {
                            eprintln!("error: {high} high-severity finding(s)");
                        }
                        ExitCode::from(exit::AUDIT_HIGH)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(bakery::audit::AuditError::GroupNotFound(g)) => report_error(
                    &reporter,
                    &format!("Auto Scaling group {g:?} not found in this region"),
                    exit::USAGE,
                ),
                Err(e) => report_error(&reporter, &e.to_string(), exit::FAILURE),
            }
        }
        Command::Status(args) => {
            let aws = match aws::Aws::connect(&target).await {
                Ok(a) => a,
                Err(e) => return report_error(&reporter, &e.to_string(), exit::USAGE),
            };
            match rollout::status::status(&aws, &args.asg).await {
                Ok(s) => {
                    if reporter.format() == Format::Json {
                        println!("{}", serde_json::to_string(&s).unwrap_or_default());
                    } else {
                        print!("{}", rollout::status::render(&s));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report_error(
                    &reporter,
                    &format!("{e}"),
                    u8::try_from(e.exit_code()).unwrap_or(exit::FAILURE),
                ),
            }
        }
    }
}

fn report_rollout_error(reporter: &Reporter, message: &str, code: i32) -> ExitCode {
    match reporter.format() {
        Format::Json => reporter.emit(Event::RolloutFailed {
            error: message.to_string(),
            exit_code: code,
        }),
        Format::Human => eprintln!("error: {message}"),
    }
    ExitCode::from(u8::try_from(code).unwrap_or(exit::FAILURE))
}

fn finish_build(reporter: &Reporter, outcome: bake::Outcome) -> ExitCode {
    let human = reporter.format() == Format::Human;
    let mut code = match &outcome.result {
        Ok(manifest) => {
            let value = serde_json::to_value(manifest).unwrap_or_default();
            if human {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                eprintln!(
                    "==> {} ({}) ready in {:.1}s",
                    manifest.ami_id, manifest.ami_name, manifest.duration_s
                );
            } else {
                reporter.emit(Event::BuildFinished { manifest: value });
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
