//! `twinkle` command line: serve, cluster control, config tools, engine tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use twinkle::node::NodeResources;

mod cli_bench;
use cli_bench::{BenchCommand, bench};

#[derive(Parser, Debug)]
#[command(
    name = "twinkle",
    version,
    about = "Training-as-a-service for LLMs (Tinker and Twinkle APIs)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as one JSON object per line (children inherit it).
    #[arg(long, global = true, value_enum, env = twinkle::metrics::logging::LOG_FORMAT_ENV,
          default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

use twinkle::metrics::logging::LogFormat;

/// The `--log-format` of this invocation (set once, first thing in `main`).
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

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
    /// Engine benchmarks on CPU (tokens/s, GFLOP/s, peak RSS); see `twinkle bench train --help`.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
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
        #[command(flatten)]
        resources: NodeResources,
        /// Loopback port of the control plane (default: any free port).
        #[arg(long, default_value_t = 0)]
        control_port: u16,
        /// Deploy onto the running cluster whose head is at `HOST:PORT` instead of running an
        /// embedded one (also TWINKLE_ADDRESS, or the cluster recorded by `start`/`join`).
        #[arg(long)]
        address: Option<String>,
        /// Cluster token (default: TWINKLE_CLUSTER_TOKEN or the recorded cluster's).
        #[arg(long)]
        token: Option<String>,
        /// For scripts: print `twinkle serve: ready (gateway http://HOST:PORT)` on stdout once
        /// every application is running (serve keeps serving), and if an application fails
        /// before that, stop everything and exit 1 with the reason.
        #[arg(long)]
        wait: bool,
    },
    /// Start a cluster node: `--head` starts the head (control port + this node's agent);
    /// `--address HOST:PORT` joins an existing head (same as `join`).
    Start {
        #[arg(long)]
        head: bool,
        /// Head to join (`start --address` = `join`).
        #[arg(long, conflicts_with = "head")]
        address: Option<String>,
        /// Control port of the head.
        #[arg(long, default_value_t = 6379)]
        port: u16,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Join a running cluster as a node agent (like `ray start --address`).
    Join {
        #[arg(long)]
        address: String,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Stop every twinkle node agent started on this machine, with their children.
    Stop {
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 30.0)]
        grace_s: f64,
    },
    /// Show the running server's nodes and applications (like `ray status`).
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Control address `HOST:PORT` (default: from `$TWINKLE_HOME/serve.json`).
        #[arg(long)]
        address: Option<String>,
        /// Refresh every N seconds (default 2), in place on a terminal; Ctrl-C to stop.
        #[arg(long, num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// Write a small deterministic random model (real Qwen3 tokenizer) into a directory.
    GenerateModel {
        /// Output directory (left unchanged when it already holds a model).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: twinkle::hub::generate::GenOptions,
    },
    /// Download a model from ModelScope (`ms://Org/Name`, bare `Org/Name`) or the Hugging Face
    /// Hub (`hf://Org/Name`) into the official cache, and print its directory. A cached model is
    /// not downloaded again. Honours HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE,
    /// MODELSCOPE_ENDPOINT, MODELSCOPE_DOMAIN, MODELSCOPE_API_TOKEN, MODELSCOPE_CACHE and
    /// TWINKLE_OFFLINE.
    Download {
        /// `ms://Org/Name[@revision]`, `hf://Org/Name[@revision]` or `Org/Name`.
        model_id: String,
        /// Branch, tag or commit (default: `master` on ModelScope, `main` on the HF Hub).
        #[arg(long)]
        revision: Option<String>,
        /// Fetch exactly the repo files matching this glob (repeatable), instead of what the
        /// engine loads (config, tokenizer, chat template, safetensors).
        #[arg(long)]
        include: Vec<String>,
        /// Progress display: bars on a terminal, log lines otherwise (`auto`), or forced.
        #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
        progress: ProgressArg,
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

/// Options of `start` and `join`.
#[derive(clap::Args, Debug, Clone)]
struct NodeArgs {
    #[command(flatten)]
    offers: NodeResources,
    /// Custom resources as JSON, e.g. '{"accel": 2}'.
    #[arg(long)]
    resources: Option<String>,
    /// Address other nodes reach this node at (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
    /// Stable node name (default: generated once, kept in $TWINKLE_HOME/node_id).
    #[arg(long)]
    node_name: Option<String>,
    /// This node's gateway port (default: the deployment's http_options.port).
    #[arg(long)]
    gateway_port: Option<u16>,
    /// Cluster token (default: TWINKLE_CLUSTER_TOKEN; the head generates one when unset).
    #[arg(long, env = "TWINKLE_CLUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Stay in the foreground instead of daemonizing.
    #[arg(long)]
    block: bool,
    #[arg(long, default_value = "info")]
    log_level: String,
}

impl NodeArgs {
    fn options(&self) -> twinkle::node::cluster_cli::NodeOptions {
        twinkle::node::cluster_cli::NodeOptions {
            resources: self.offers.clone(),
            custom_resources: self.resources.clone(),
            node_ip: self.node_ip.clone(),
            node_name: self.node_name.clone(),
            gateway_port: self.gateway_port,
            log_level: self.log_level.clone(),
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ProgressArg {
    Auto,
    Bars,
    Lines,
    Off,
}

impl From<ProgressArg> for twinkle::hub::BarMode {
    fn from(p: ProgressArg) -> Self {
        match p {
            ProgressArg::Auto => Self::Auto,
            ProgressArg::Bars => Self::Bars,
            ProgressArg::Lines => Self::Lines,
            ProgressArg::Off => Self::Off,
        }
    }
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
    Identity,
}

impl From<ImportPathArg> for twinkle::config::ImportPath {
    fn from(t: ImportPathArg) -> Self {
        match t {
            ImportPathArg::Server => Self::Server,
            ImportPathArg::Model => Self::Model,
            ImportPathArg::Sampler => Self::Sampler,
            ImportPathArg::Processor => Self::Processor,
            ImportPathArg::Identity => Self::Identity,
        }
    }
}

/// Logs to stderr at `level` in this invocation's `--log-format`.
fn init_logging(level: &str) {
    let format = LOG_FORMAT.get().copied().unwrap_or_default();
    twinkle::metrics::logging::init(level, format);
}

fn status(json: bool, address: Option<String>, watch: Option<f64>) -> anyhow::Result<()> {
    let home = twinkle::head::state_file::twinkle_home();
    let cluster = twinkle::head::cluster_record::read_cluster(&home);
    // Status needs a token: the cluster's for a cluster head, else the serve's own.
    let (addr, token) = match (address, cluster) {
        (Some(a), Some(c)) if a == c.address => (a, c.token),
        (Some(a), _) => {
            let token = std::env::var("TWINKLE_CLUSTER_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or_else(|| twinkle::head::state_file::read(&home).ok().map(|r| r.token))
                .unwrap_or_default();
            (a, token)
        }
        (None, Some(c)) => (c.address, c.token),
        (None, None) => {
            let rec = twinkle::head::state_file::read(&home)?;
            (rec.control_address, rec.token)
        }
    };
    let every = watch
        .map(|s| std::time::Duration::from_secs_f64(if s.is_finite() { s.max(0.2) } else { 2.0 }));
    Ok(twinkle::head::status_cli::show(&addr, &token, json, every)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.log_format != LogFormat::Text {
        // SAFETY: nothing else runs yet (no thread has started), so no one reads the
        // environment concurrently; the children `serve` forks inherit the format from it.
        unsafe {
            std::env::set_var(twinkle::metrics::logging::LOG_FORMAT_ENV, cli.log_format.as_str())
        };
    }
    let _ = LOG_FORMAT.set(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => {
            match twinkle::config::load_file_with_warnings(&config) {
                Ok((_, warnings)) => {
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
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
        Command::GenerateModel { out, model } => {
            use twinkle::hub::generate::generate_model;
            match generate_model(&out, &model) {
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
        Command::Download { model_id, revision, include, progress } => {
            init_logging("info");
            let opts = twinkle::hub::FetchOptions {
                revision,
                include,
                progress: None,
                bar: progress.into(),
            };
            match twinkle::hub::resolve_or_download(
                &model_id,
                &twinkle::hub::HubEnv::from_process(),
                &opts,
            ) {
                Ok(dir) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("twinkle download: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench { what } => match bench(what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinkle bench: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve {
            config,
            server_type,
            namespace,
            log_level,
            resources,
            control_port,
            address,
            token,
            wait,
        } => {
            init_logging(&log_level);
            if let Some(cluster) = twinkle::node::cluster_cli::resolve(address, token) {
                return deploy_to_cluster(&cluster, &config, server_type);
            }
            let opts = twinkle::node::serve::ServeOptions {
                config_path: config,
                server_type,
                namespace,
                resources,
                control_port,
                log_level,
                wait,
            };
            match twinkle::node::serve::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinkle serve: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Start { head, address, port, node } => start_node(head, address, port, node),
        Command::Join { address, node } => start_node(false, Some(address), 0, node),
        Command::Stop { grace_s } => {
            let grace = if grace_s.is_finite() && grace_s >= 0.0 { grace_s } else { 30.0 };
            let n = twinkle::node::cluster_cli::stop(std::time::Duration::from_secs_f64(grace));
            println!("Stopped {n} twinkle node agent(s) on this machine.");
            ExitCode::SUCCESS
        }
        Command::Status { json, address, watch } => match status(json, address, watch) {
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
            match twinkle::apps::run_worker(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ twinkle::worker::WorkerError::Startup(_)) => {
                    eprintln!("twinkle worker: {e}");
                    twinkle::worker::report_startup_error(&e.to_string());
                    ExitCode::from(twinkle::contract::STARTUP_ERROR_EXIT)
                }
                Err(e) => {
                    eprintln!("twinkle worker: {e}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

/// `serve --address`: submit the deployment to the cluster head.
fn deploy_to_cluster(
    cluster: &twinkle::head::cluster_record::ClusterRecord,
    config: &std::path::Path,
    server_type: Option<twinkle::config::ServerType>,
) -> ExitCode {
    match twinkle::node::cluster_cli::deploy(cluster, &config.to_path_buf(), server_type) {
        Ok(n) => {
            println!("Deployment {n} submitted to the cluster at {}.", cluster.address);
            println!("Check where each application runs with `twinkle status`.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("twinkle serve: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `start --head`, `start --address`, `join`: foreground with `--block`, else a daemon.
fn start_node(head: bool, address: Option<String>, port: u16, node: NodeArgs) -> ExitCode {
    use twinkle::node::cluster_cli;
    if !head && address.is_none() {
        eprintln!("twinkle start: pass --head to start a head, or --address HOST:PORT to join one");
        return ExitCode::from(2);
    }
    if node.block {
        init_logging(&node.log_level);
        let result = if head {
            cluster_cli::run_head(
                node.options(),
                cluster_cli::HeadOptions { port, token: node.token.clone() },
            )
        } else {
            let address = address.unwrap_or_default();
            let token = cluster_cli::resolve(Some(address.clone()), node.token.clone())
                .map(|c| c.token)
                .unwrap_or_default();
            cluster_cli::run_join(node.options(), address, token)
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinkle {}: {e}", if head { "start" } else { "join" });
                ExitCode::from(e.exit_code())
            }
        };
    }
    // Daemon: the same command again in the background with --block.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let role = if head { "head" } else { "node" };
    match cluster_cli::daemonize(role, args) {
        Ok(pid) => {
            let home = twinkle::head::state_file::twinkle_home();
            let rec = twinkle::head::cluster_record::read_cluster(&home);
            let addr = rec.as_ref().map(|r| r.address.clone()).unwrap_or_default();
            if head {
                println!("Twinkle head started (pid {pid}); control address {addr}.");
                println!("To add a node to this cluster, run on that node:");
                let token = rec.map(|r| r.token).unwrap_or_default();
                println!("  twinkle join --address {addr} --token {token}");
            } else {
                println!("Twinkle node agent started (pid {pid}), joined {addr}.");
            }
            println!("To stop the agents on this machine: twinkle stop");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("twinkle {}: {e}", if head { "start" } else { "join" });
            ExitCode::from(1)
        }
    }
}

fn verify_golden(dirs: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    let progress = twinkle::progress::Progress::new("verify-golden", dirs.len() as u64);
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
        progress.advance(1, &dir.display().to_string());
    }
    progress.finish();
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
