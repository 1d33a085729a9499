//! (being written)
/// Runs the daemon until SIGTERM/SIGINT.
pub fn main(_config: crate::config::Config) -> anyhow::Result<()> {
    Ok(())
}
