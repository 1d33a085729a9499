//! (being written)
/// The validated configuration.
pub struct Config {}
