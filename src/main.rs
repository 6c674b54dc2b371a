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
    /// Run the whole platform on this machine: head, gateway and one child per application.
    Serve {
        #[arg(short, long, env = "TWINKLE_SERVER_CONFIG")]
        config: PathBuf,
        /// Overrides the config's `server_type`.
        #[arg(short = 't', long)]
        server_type: Option<twinkle::config::ServerType>,
        /// Namespace shown in status (Ray's `--namespace`; informational on one machine).
        #[arg(long)]
        namespace: Option<String>,
        /// Log filter, e.g. `info`, `debug`, `twinkle=debug` (RUST_LOG syntax).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// GPUs this node offers (default: what NVML reports, limited by CUDA_VISIBLE_DEVICES).
        #[arg(long)]
        num_gpus: Option<u32>,
        /// CPUs this node offers (default: the CPUs the OS reports).
        #[arg(long)]
        num_cpus: Option<f64>,
        /// Loopback port of the control plane (default: any free port).
        #[arg(long, default_value_t = 0)]
        control_port: u16,
    },
    /// Show the running server's nodes and applications (like `ray status`).
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Control address `HOST:PORT` (default: from `$TWINKLE_HOME/serve.json`).
        #[arg(long)]
        address: Option<String>,
    },
    /// Write a small deterministic random model (real Qwen3 tokenizer) into a directory.
    GenerateModel {
        /// Output directory (left unchanged when it already holds a model).
        #[arg(long)]
        out: PathBuf,
        /// Architecture (only qwen3).
        #[arg(long, default_value = "qwen3")]
        arch: String,
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        #[arg(long, default_value_t = 16)]
        head_dim: usize,
        #[arg(long, default_value_t = 128)]
        intermediate: usize,
        #[arg(long, default_value_t = 4096)]
        max_position: usize,
        #[arg(long, default_value_t = 0x7769_6e6b_6c65)]
        seed: u64,
    },
    /// Internal: one application child, started by `twinkle serve`.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        app: String,
        #[arg(long, value_enum)]
        import_path: ImportPathArg,
        #[arg(long, default_value = "/")]
        route_prefix: String,
        #[arg(long, default_value = "twinkle")]
        server_type: twinkle::config::ServerType,
        /// The head's control address.
        #[arg(long)]
        head: String,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Seconds to keep retrying the registration.
        #[arg(long, env = "TWINKLE_REGISTER_DEADLINE_S", default_value_t = 60.0)]
        register_deadline_s: f64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConfigFormat {
    Yaml,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ImportPathArg {
    Server,
    Model,
    Sampler,
    Processor,
}

impl From<ImportPathArg> for twinkle::config::ImportPath {
    fn from(t: ImportPathArg) -> Self {
        match t {
            ImportPathArg::Server => Self::Server,
            ImportPathArg::Model => Self::Model,
            ImportPathArg::Sampler => Self::Sampler,
            ImportPathArg::Processor => Self::Processor,
        }
    }
}

/// Logs to stderr. A bare level (`info`) also quiets actix's per-worker start/stop lines.
fn init_logging(level: &str) {
    use std::io::IsTerminal as _;
    let spec =
        if level.contains('=') { level.to_string() } else { format!("{level},actix_server=warn") };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn status(json: bool, address: Option<String>) -> anyhow::Result<()> {
    let addr = match address {
        Some(a) => a,
        None => {
            twinkle::head::state_file::read(&twinkle::head::state_file::twinkle_home())?
                .control_address
        }
    };
    let report = actix_web::rt::System::new().block_on(twinkle::head::status_cli::fetch(&addr))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", twinkle::head::status_cli::render(&report));
    }
    Ok(())
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
        Command::GenerateModel {
            out,
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            max_position,
            seed,
        } => {
            use twinkle::hub::generate::{GenOptions, QWEN3_VOCAB, generate_model};
            let o = GenOptions {
                arch,
                hidden,
                layers,
                heads,
                kv_heads,
                head_dim,
                intermediate,
                vocab: QWEN3_VOCAB,
                max_position,
                seed,
            };
            match generate_model(&out, &o) {
                Ok(()) => {
                    println!("{}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("twinkle generate-model: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Serve {
            config,
            server_type,
            namespace,
            log_level,
            num_gpus,
            num_cpus,
            control_port,
        } => {
            init_logging(&log_level);
            let opts = twinkle::node::serve::ServeOptions {
                config_path: config,
                server_type,
                namespace,
                num_gpus,
                num_cpus,
                control_port,
                log_level,
            };
            match twinkle::node::serve::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinkle serve: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Status { json, address } => match status(json, address) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinkle status: {e}");
                ExitCode::from(1)
            }
        },
        Command::Worker {
            app,
            import_path,
            route_prefix,
            server_type,
            head,
            config,
            log_level,
            register_deadline_s,
        } => {
            init_logging(&log_level);
            let deadline = if register_deadline_s.is_finite() && register_deadline_s > 0.0 {
                std::time::Duration::from_secs_f64(register_deadline_s)
            } else {
                std::time::Duration::from_secs(60)
            };
            let opts = twinkle::worker::WorkerOptions {
                app,
                import_path: import_path.into(),
                route_prefix,
                server_type,
                head,
                config,
                register_deadline: deadline,
            };
            match twinkle::worker::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinkle worker: {e}");
                    ExitCode::from(3)
                }
            }
        }
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
