//! The binary: parse flags, call the library.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Parser;
use istio_vault_webhook::cli::{CheckArgs, Cli, Command, RenderArgs, ServeArgs};
use istio_vault_webhook::config::Config;
use istio_vault_webhook::{render, server};

/// mimalloc: cheaper allocations on the admission path than glibc's malloc,
/// and a small heap (README, "Benchmarks").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Render(args)) => match run_render(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Certs(args)) => match istio_vault_webhook::certs::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Doctor(args)) => ExitCode::from(istio_vault_webhook::doctor::main(&args)),
        Some(Command::Export(args)) => ExitCode::from(istio_vault_webhook::export::main(&args)),
        None => serve(ServeArgs::default_for_cli()),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    match server::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let mut ok = true;
    for file in &args.files {
        let result = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| Config::from_document(&text).map_err(|e| e.to_string()));
        match result {
            Ok(c) => println!("{}: ok ({})", file.display(), c.summary()),
            Err(e) => {
                ok = false;
                for line in e.lines() {
                    eprintln!("{}: {line}", file.display());
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_render(args: &RenderArgs) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| format!("{}: cannot read: {e}", args.config.display()))?;
    let config =
        Config::from_document(&text).map_err(|e| format!("{}: {e}", args.config.display()))?;
    let mut inputs = Vec::new();
    if args.files.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        inputs.push(("stdin".to_owned(), s));
    }
    for f in &args.files {
        let s =
            std::fs::read_to_string(f).map_err(|e| format!("{}: cannot read: {e}", f.display()))?;
        inputs.push((f.display().to_string(), s));
    }

    let mut docs = Vec::new();
    for (name, text) in &inputs {
        docs.extend(render::render(&config, text).map_err(|e| format!("{name}: {e}"))?);
    }
    let mut denied = false;
    for d in &docs {
        for w in &d.warnings {
            eprintln!("warning: {}: {w}", d.what);
        }
        if let Some(message) = &d.denied {
            denied = true;
            eprintln!("denied: {}: {message}", d.what);
        }
    }
    let mut out = std::io::stdout().lock();
    let written = if args.patch {
        docs.iter().try_for_each(|d| {
            let line =
                String::from_utf8_lossy(&istio_vault_webhook::patch::to_json(&d.ops)).into_owned();
            writeln!(out, "{line}")
        })
    } else {
        out.write_all(render::to_yaml(&docs)?.as_bytes())
    };
    written.map_err(|e| format!("stdout: {e}"))?;
    Ok(if denied {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
