//! `twinkle` command line: serve, cluster control, config tools, engine tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "twinkle",
    version,
    about = "Training-as-a-service for LLMs (Tinker and Twinkle APIs)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a configuration file: prints `ok` or the error (exit 2).
    CheckConfig {
        #[arg(short, long, env = "TWINKLE_SERVER_CONFIG")]
        config: PathBuf,
    },
    /// Check the engine against PyTorch golden case directories (exit 1 on any miss).
    VerifyGolden {
        /// Case directories (model/, adapter/, case.json, expected.safetensors).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match twinkle::config::load_file(&config) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::VerifyGolden { dirs } => verify_golden(&dirs),
    }
}

fn verify_golden(dirs: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for dir in dirs {
        match twinkle::engine::golden::verify(dir) {
            Ok(report) => {
                println!("{report}");
                ok &= report.passed();
            }
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                ok = false;
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
