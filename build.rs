//! Build script: records the git commit the binary is built from, for `tokend --version`
//! (`TOKEND_GIT_COMMIT`, read with `env!` in `src/main.rs`).
//!
//! Order: the environment variable `TOKEND_GIT_COMMIT` when set (a distribution building
//! from a tarball can pass the commit it knows), else `git rev-parse` when this directory is
//! the top of a git work tree, else `unknown` (a tarball without git: the build still works).
//! A tarball unpacked inside some other repository is not mistaken for it: the work tree's
//! top must be this package's directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What `--version` says when the commit cannot be known.
const UNKNOWN: &str = "unknown";
/// Hex digits of the abbreviated commit: unambiguous in any repository of this size.
const COMMIT_DIGITS: &str = "--short=12";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TOKEND_GIT_COMMIT");
    let commit = std::env::var("TOKEND_GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| UNKNOWN.to_owned());
    println!("cargo:rustc-env=TOKEND_GIT_COMMIT={commit}");
}

/// The commit of HEAD, and the files whose change moves it (so cargo reruns this script on a
/// new commit or checkout, and only then).
fn git_commit() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = git(&dir, &["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(&dir).ok()? {
        return None;
    }
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        // Only files that exist: cargo reruns a script on every build for a missing one
        // (a ref lives either in its own file or in packed-refs).
        if let Some(path) = git(&dir, &["rev-parse", "--git-path", &name])
            .map(|p| dir.join(p))
            .filter(|p| p.exists())
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&dir, &["rev-parse", COMMIT_DIGITS, "HEAD"])
}

/// One line of git's output, or `None` when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
