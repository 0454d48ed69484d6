//! The `statecast` command. Everything lives in the library; see `statecast --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = statecast::Cli::parse();
    match statecast::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
