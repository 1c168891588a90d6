//! `cinderblock`: argument parsing and start-up only; everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use cinderblock::cli::{Cli, Command};
use cinderblock::config::{self, AgentConfig, AllConfig, ControllerConfig, NodeConfig};
use cinderblock::{logging, ops, roles, transport};

/// Exit code for a configuration rejected at start.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let is_config = e.chain().any(|c| c.is::<config::ConfigError>());
            eprintln!("cinderblock: error: {}", logging::error_chain(e.as_ref()));
            if is_config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match cli.command {
        Command::Controller(args) => {
            let mut cfg: ControllerConfig = config::load(args.config.config.as_deref())?;
            if let Some(e) = args.endpoint {
                cfg.endpoint = e;
            }
            if let Some(e) = args.operator_listen {
                cfg.operator_listen = Some(e);
            }
            cfg.agents
                .extend(cinderblock::cli::parse_agent_flags(&args.agents)?);
            cfg.validate("")?;
            runtime()?.block_on(async {
                transport::cancel_on_signals(shutdown.clone());
                roles::run_controller(cfg, shutdown).await
            })?;
        }
        Command::Node(args) => {
            let mut cfg: NodeConfig = config::load(args.config.config.as_deref())?;
            if let Some(e) = args.endpoint {
                cfg.endpoint = e;
            }
            args.node.apply(&mut cfg);
            if let Some(k) = args.chap_key_file {
                cfg.chap_key_file = Some(k);
            }
            cfg.validate("")?;
            runtime()?.block_on(async {
                transport::cancel_on_signals(shutdown.clone());
                roles::run_node(cfg, shutdown).await
            })?;
        }
        Command::Agent(args) => {
            let mut cfg: AgentConfig = config::load(args.config.config.as_deref())?;
            args.agent.apply(&mut cfg);
            cfg.validate("")?;
            runtime()?.block_on(async {
                transport::cancel_on_signals(shutdown.clone());
                roles::run_agent(cfg, shutdown).await
            })?;
        }
        Command::All(args) => {
            let mut cfg: AllConfig = config::load(args.config.config.as_deref())?;
            if let Some(e) = args.endpoint {
                cfg.endpoint = Some(e);
            }
            args.agent.apply(&mut cfg.agent);
            args.node.apply(&mut cfg.node);
            cfg.validate()?;
            runtime()?.block_on(async {
                transport::cancel_on_signals(shutdown.clone());
                roles::run_all(cfg, args.without_node, shutdown).await
            })?;
        }
        Command::Identity(args) => {
            let report = runtime()?.block_on(ops::identity(&args))?;
            ops::print_identity(&report, args.output);
        }
        Command::AgentCtl(args) => runtime()?.block_on(ops::agent::run(args))?,
        Command::BenchCsi(args) => {
            let output = args.output;
            let report = runtime()?.block_on(ops::bench::bench_csi(args))?;
            ops::bench::print_report(&report, output);
            ops::bench::failures(&report, "CreateVolume")?;
        }
        Command::BenchAttach(args) => {
            let output = args.output;
            let report = runtime()?.block_on(ops::bench_attach::bench_attach(args))?;
            ops::bench_attach::print_report(&report, output);
        }
        Command::Volume(args) => runtime()?.block_on(ops::operator::volume(args))?,
        Command::Snapshot(args) => runtime()?.block_on(ops::operator::snapshot(args))?,
        Command::Pool(args) => runtime()?.block_on(ops::operator::pool(args))?,
        Command::Type(args) => runtime()?.block_on(ops::operator::volume_type(args))?,
        Command::Backup(args) => runtime()?.block_on(ops::backup::backup(args))?,
        Command::Crds => print!("{}", cinderblock::k8s::crd::crds_yaml()?),
    }
    Ok(())
}
