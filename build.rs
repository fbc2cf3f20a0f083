//! Puts the commit the binary is built from in `PANDAGATE_COMMIT`, for
//! `--version` and `pandagate_build_info`: `PANDAGATE_BUILD_COMMIT` when the
//! builder sets it (a container build has no `.git`), else what git says of
//! the work tree, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PANDAGATE_BUILD_COMMIT");
    let given = std::env::var("PANDAGATE_BUILD_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let commit = given.or_else(|| {
        // A new commit or a checkout changes HEAD or the branch it names.
        for path in ["HEAD", "packed-refs"] {
            if let Some(file) = git(&["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={file}");
            }
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
            && let Some(file) = git(&["rev-parse", "--git-path", &branch])
        {
            println!("cargo:rerun-if-changed={file}");
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    let commit = commit
        .filter(|c| {
            c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=PANDAGATE_COMMIT={commit}");
}
