//! The command line, as clap sees it. Only argument shapes live here; each command's module
//! turns these "low" arguments into a validated plan before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bake::OnError;
use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "bakery",
    version,
    about = "Bake AMIs, roll them into Auto Scaling Groups, keep fleets healthy",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// AWS region (default: AWS_REGION or the profile's region).
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// AWS profile from the shared config files.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub profile: Option<String>,
    /// Send every AWS call to this endpoint (e.g. a local emulator).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// `human` progress on stderr, or `json`: one event per line on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    pub output: Format,
    /// More log detail on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors and the result.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Never draw progress (it is also off when stderr is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bake an AMI from a recipe.
    Build(BuildArgs),
    /// Check a recipe without calling AWS.
    Validate(RecipeArgs),
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file (TOML).
    pub recipe: PathBuf,
    /// Set a recipe variable: --var name=value (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Read variables from a TOML file of `name = "value"` lines (repeatable).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// What to do with temporary resources when the bake fails.
    #[arg(long, value_enum, default_value_t = OnError::Cleanup)]
    pub on_error: OnError,
    /// Accept the instance's SSH host key without checking it against the console output.
    #[arg(long)]
    pub trust_host_key_on_first_use: bool,
    /// Where to write the manifest.
    #[arg(long, default_value = "bakery-manifest.json")]
    pub manifest: PathBuf,
}
