//! The consent flow over the socket API: `POST /v1/authorizations`, then the body of the
//! `POST /v1/connections` that completes it with a code the fake minted.

use serde_json::{Value, json};

use super::TestDaemon;

/// The daemon's answer to `POST /v1/authorizations`.
#[derive(Clone, Debug)]
pub struct Authorization {
    /// The consent screen's URL.
    pub authorize_url: String,
    /// The single-use `state` to send back with the code.
    pub state: String,
    /// Where the consent screen sends the browser (a code is minted for it).
    pub redirect_uri: String,
}

/// Starts a consent: `POST /v1/authorizations` must answer 200 with its three fields.
pub fn authorize(d: &TestDaemon) -> Authorization {
    let r = d.post_json("/v1/authorizations", &json!({"provider": "atlassian"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let field = |name: &str| {
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .to_owned()
    };
    Authorization {
        authorize_url: field("authorize_url"),
        state: field("state"),
        redirect_uri: field("redirect_uri"),
    }
}

/// The body of the `POST /v1/connections` that completes a consent.
pub fn consent_body(label: &str, code: &str, state: &str) -> Value {
    json!({"provider": "atlassian", "label": label, "code": code, "state": state})
}
