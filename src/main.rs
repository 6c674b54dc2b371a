//! `twinkle` command line: serve, cluster control, config tools, engine tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Print a configuration file with every default filled in (loads again unchanged).
    PrintConfig {
        #[arg(short, long, env = "TWINKLE_SERVER_CONFIG")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = ConfigFormat::Yaml)]
        format: ConfigFormat,
        /// Override the file's `server_type` (twinkle or tinker), as `serve` does.
        #[arg(short = 't', long)]
        server_type: Option<twinkle::config::ServerType>,
    },
    /// Check the engine against PyTorch golden case directories (exit 1 on any miss).
    VerifyGolden {
        /// Case directories (model/, adapter/, case.json, expected.safetensors).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConfigFormat {
    Yaml,
    Json,
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
        Command::PrintConfig { config, format, server_type } => {
            let loaded = twinkle::config::load_file(&config).map(|c| match server_type {
                Some(t) => c.with_server_type(t),
                None => c,
            });
            let rendered = loaded.and_then(|c| match format {
                ConfigFormat::Yaml => c.to_yaml(),
                ConfigFormat::Json => c.to_json(),
            });
            match rendered {
                Ok(text) => {
                    print!("{text}");
                    if !text.ends_with('\n') {
                        println!();
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
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
