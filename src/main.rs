//! `pandagate`: see `pandagate --help` and README.md.

/// Each serving thread allocates and frees a few small buffers per call;
/// mimalloc keeps those on per-thread free lists, where glibc's malloc spent
/// about a twentieth of a call's CPU (consolidating, trimming its arenas).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pandagate::cli::main()
}
