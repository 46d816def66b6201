//! The `ferry` command line: `demo`, `send`, `receive`, `vm`.

mod cmd;

use clap::{ArgAction, Parser, Subcommand};

/// Ferry: live migration for KVM guests.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log to stderr: -v info, -vv debug, -vvv trace (RUST_LOG, when set, wins);
    /// default: warnings and errors only.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Migrate a running guest to a second local process and verify the result.
    Demo(cmd::demo::DemoArgs),
    /// Boot a guest and migrate it to a `ferry receive`.
    Send(cmd::send::SendArgs),
    /// Wait for a migration and run the guest it brings.
    Receive(cmd::receive::ReceiveArgs),
    /// Run a guest with a QMP endpoint (like `qemu-system-x86_64 -qmp ... -incoming ...`).
    Vm(cmd::vm::VmCmdArgs),
    /// Boot a guest and measure its dirty rate (calc-dirty-rate), print query-dirty-rate.
    DirtyRate(cmd::dirty_rate::DirtyRateCmdArgs),
}

fn main() {
    let cli = Cli::parse();
    cmd::logging::init(cli.verbose);
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Send(a) => cmd::send::run(a),
        Command::Receive(a) => cmd::receive::run(a),
        Command::Vm(a) => cmd::vm::run(a),
        Command::DirtyRate(a) => cmd::dirty_rate::run(a),
    };
    if let Err(e) = result {
        eprintln!("ferry: {e}");
        std::process::exit(1);
    }
}
