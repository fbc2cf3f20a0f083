//! The fuzz targets' properties on stable Rust, in every test run: each
//! target replays its seed corpus (`fuzz/seeds/`), every input a fuzzing run
//! ever found failing (`fuzz/regressions/`, kept forever), and a bounded
//! number of deterministic mutations of the seeds. The coverage-guided runs
//! themselves are `fuzz/run.sh` (nightly, libFuzzer).

use std::path::Path;

use pandagate::fuzzing;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("request_edge", fuzzing::request_edge),
    ("envelope_prefix", fuzzing::envelope_prefix),
    ("config_text", fuzzing::config_text),
    ("callback", fuzzing::callback),
];

/// Mutations of each seed, per target: enough to walk the edges of the
/// inputs, few enough to stay well under a second.
const MUTATIONS_PER_SEED: u64 = 300;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

fn fuzz_dir(kind: &str, target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

#[test]
fn every_target_has_seeds_and_they_hold() {
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz_dir("seeds", name));
        assert!(seeds.len() >= 3, "{name}: {} seeds", seeds.len());
        for (file, data) in seeds {
            println!("{name}: {file}");
            target(&data);
        }
    }
}

#[test]
fn saved_regressions_hold() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for (file, data) in inputs(&fuzz_dir("regressions", name)) {
            println!("{name}: {file}");
            target(&data);
            replayed += 1;
        }
    }
    println!("{replayed} regression inputs replayed");
}

/// xorshift64*: deterministic, so a failure here reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Flips, inserts, deletes, truncates and splices bytes that matter to HTTP,
/// JSON and TOML.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\r\n\0:%./\\\"{}[]=,# \t\x7f\xff";
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(5) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 => data.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            2 if at < data.len() => {
                data.remove(at);
            }
            3 => data.truncate(at),
            _ => {
                let from = rng.below(seed.len());
                let len = rng.below(seed.len() - from + 1);
                data.splice(at..at, seed[from..from + len].iter().copied());
            }
        }
    }
    data
}

#[test]
fn mutated_seeds_hold() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz_dir("seeds", name));
        for (file, seed) in &seeds {
            for i in 0..MUTATIONS_PER_SEED {
                let data = mutate(seed, &mut rng);
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(
                    outcome.is_ok(),
                    "{name}: mutation {i} of {file} broke a property; input (save it under fuzz/regressions/{name}/): {data:?}"
                );
            }
        }
    }
}
