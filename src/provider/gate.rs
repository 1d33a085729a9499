//! The `Retry-After` gate: back-pressure per provider endpoint. A 429 or 503 with
//! `Retry-After` pauses every call to that endpoint, for every connection, until the pause
//! ends; then one call probes and the others wait for its answer, which reopens the endpoint
//! or pauses it again.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use super::{ProviderError, TransientKind};

/// How long a caller waits before trying again when another call is already probing an
/// endpoint whose `Retry-After` pause just ended: the probe's answer decides for everyone.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// A provider endpoint. Back-pressure (`Retry-After` on 429/503) applies per endpoint: one
/// such answer pauses every call to that endpoint, for every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /oauth/token`.
    Token,
    /// `GET /oauth/token/accessible-resources`.
    Resources,
    /// `GET /me`.
    Me,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Token => "the token endpoint",
            Endpoint::Resources => "accessible-resources",
            Endpoint::Me => "/me",
        }
    }
}

/// The gates of every endpoint, shared by all clones of one client.
#[derive(Clone, Default)]
pub(super) struct Gates(Arc<Mutex<HashMap<Endpoint, Gate>>>);

impl Gates {
    /// Lets a call through unless the endpoint is paused by a `Retry-After`.
    pub(super) fn admit(&self, endpoint: Endpoint) -> Result<Admission, ProviderError> {
        let mut gates = self.0.lock();
        let gate = gates.entry(endpoint).or_default();
        let mut probe = false;
        if let Some(until) = gate.paused_until {
            let now = Instant::now();
            if now < until {
                return Err(ProviderError::Transient {
                    kind: TransientKind::RateLimited,
                    retry_after: Some(until - now),
                    message: format!(
                        "{} asked tokend to wait (Retry-After); not calling it until then",
                        endpoint.name()
                    ),
                });
            }
            if gate.probing {
                return Err(ProviderError::Transient {
                    kind: TransientKind::RateLimited,
                    retry_after: Some(PROBE_WAIT),
                    message: format!(
                        "{} is being probed after a Retry-After pause",
                        endpoint.name()
                    ),
                });
            }
            gate.probing = true;
            probe = true;
        }
        Ok(Admission {
            gates: self.clone(),
            endpoint,
            probe,
            settled: false,
        })
    }
}

/// Back-pressure state of one endpoint.
#[derive(Default)]
struct Gate {
    /// No call before this instant (the provider's `Retry-After`).
    paused_until: Option<Instant>,
    /// After a pause ends, one call probes; the others wait for its answer.
    probing: bool,
}

/// Admission to call an endpoint; a probe reopens the endpoint or pauses it again. Dropping
/// it (even by cancellation) releases the probe.
pub(super) struct Admission {
    /// The gates this admission reports back to.
    gates: Gates,
    endpoint: Endpoint,
    probe: bool,
    settled: bool,
}

impl Admission {
    /// Records the answer: a 429/503 with `Retry-After` pauses the endpoint.
    pub(super) fn settle(mut self, status: Option<StatusCode>, retry_after: Option<Duration>) {
        let mut gates = self.gates.0.lock();
        let gate = gates.entry(self.endpoint).or_default();
        let pausing = matches!(
            status,
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
        ) && retry_after.is_some();
        if let (true, Some(r)) = (pausing, retry_after) {
            let until = Instant::now() + r;
            if gate.paused_until.is_none_or(|p| p < until) {
                gate.paused_until = Some(until);
            }
            tracing::warn!(
                endpoint = self.endpoint.name(),
                retry_after_secs = r.as_secs(),
                "the provider asked to wait; pausing every call to this endpoint"
            );
        } else if self.probe {
            gate.paused_until = None;
        }
        if self.probe {
            gate.probing = false;
        }
        self.settled = true;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let mut gates = self.gates.0.lock();
            gates.entry(self.endpoint).or_default().probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_the_endpoint_for_everyone_then_one_probe_reopens_it() {
        let c = Gates::default();
        c.admit(Endpoint::Token).unwrap().settle(
            Some(StatusCode::TOO_MANY_REQUESTS),
            Some(Duration::from_secs(5)),
        );
        let paused = c.admit(Endpoint::Token).err().expect("paused");
        assert!(!paused.maybe_processed());
        let r = paused.retry_after().unwrap();
        assert!(
            r > Duration::from_secs(4) && r <= Duration::from_secs(5),
            "{r:?}"
        );
        // Other endpoints are not paused.
        assert!(c.admit(Endpoint::Me).is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = c.admit(Endpoint::Token).expect("one probe");
        let waiting = c
            .admit(Endpoint::Token)
            .err()
            .expect("others wait for the probe");
        assert_eq!(waiting.retry_after(), Some(PROBE_WAIT));
        probe.settle(Some(StatusCode::OK), None);
        assert!(c.admit(Endpoint::Token).is_ok());
        assert!(c.admit(Endpoint::Token).is_ok());
        // A dropped probe (a cancelled call) does not wedge the endpoint.
        c.admit(Endpoint::Token).unwrap().settle(
            Some(StatusCode::SERVICE_UNAVAILABLE),
            Some(Duration::from_secs(1)),
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(c.admit(Endpoint::Token).unwrap());
        assert!(c.admit(Endpoint::Token).is_ok());
        // A 503 without Retry-After does not pause anyone.
        c.admit(Endpoint::Resources)
            .unwrap()
            .settle(Some(StatusCode::SERVICE_UNAVAILABLE), None);
        assert!(c.admit(Endpoint::Resources).is_ok());
    }
}
