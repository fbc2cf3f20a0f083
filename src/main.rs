//! `pandagate`: see `pandagate --help` and README.md.

fn main() -> std::process::ExitCode {
    pandagate::main()
}
