//! The `comet` binary: parse the configuration, run the server.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = comet::config::Cli::parse();
    let config = match comet::config::Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comet: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match comet::server::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comet: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
