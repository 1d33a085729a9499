//! The HTTP client of one Atlassian OAuth app: the token requests (refresh and code
//! exchange, JSON bodies as Atlassian documents), accessible-resources, `/me`, the authorize
//! URL. Every call passes the `Retry-After` gate first; every answer is read by `classify`.

use std::time::Duration;

use reqwest::StatusCode;

use super::classify::{
    classify_error, parse_grant, parse_me, parse_resources, parse_retry_after, transport_error,
};
use super::gate::{Endpoint, Gates};
use super::{Account, Grant, ProviderError};
use crate::config::AtlassianConfig;
use crate::model::{Site, Time};
use crate::secret::Secret;

/// A client for one Atlassian OAuth app.
#[derive(Clone)]
pub struct Atlassian {
    /// One connection pool for every call.
    http: reqwest::Client,
    /// The app: client id and secret, endpoints, scopes.
    config: AtlassianConfig,
    /// The `Retry-After` pauses, shared by every clone (one per engine task).
    gates: Gates,
}
impl Atlassian {
    /// Builds a client. `request_timeout` bounds every call, connect included; redirects are
    /// never followed (a redirected token request is a misconfiguration or an attack).
    pub fn new(config: AtlassianConfig, request_timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(request_timeout)
            .connect_timeout(request_timeout)
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Atlassian {
            http,
            config,
            gates: Gates::default(),
        })
    }

    /// The app's client id (part of a chain's identity).
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &AtlassianConfig {
        &self.config
    }
    /// The client secret, or why the app cannot be used (the config decides what is missing).
    fn credentials(&self) -> Result<&Secret, ProviderError> {
        if let Some(missing) = self.config.missing_credentials() {
            return Err(ProviderError::NotConfigured(missing));
        }
        self.config.client_secret.as_ref().ok_or_else(|| {
            ProviderError::NotConfigured("the Atlassian client secret is not loaded".to_owned())
        })
    }

    /// Why this client cannot talk to Atlassian, if it cannot.
    pub fn not_configured(&self) -> Option<String> {
        self.credentials().err().map(|e| e.to_string())
    }

    /// Exchanges a refresh token for a new access token (and, normally, a new refresh token).
    pub async fn refresh(&self, refresh_token: &Secret) -> Result<Grant, ProviderError> {
        self.token_request("refresh_token", ("refresh_token", refresh_token), &[])
            .await
    }

    /// Exchanges an authorization code from the consent screen.
    pub async fn exchange_code(&self, code: &Secret) -> Result<Grant, ProviderError> {
        let redirect_uri = self.config.redirect_uri.as_str();
        self.token_request(
            "authorization_code",
            ("code", code),
            &[("redirect_uri", redirect_uri)],
        )
        .await
    }

    /// A `grant_type` request to the token endpoint presenting `credential` (the refresh
    /// token or the code, under its field name) with the client id and secret in the JSON
    /// body, as Atlassian documents; `extra` fields hold no secret.
    async fn token_request(
        &self,
        grant_type: &str,
        (field, credential): (&str, &Secret),
        extra: &[(&str, &str)],
    ) -> Result<Grant, ProviderError> {
        let secret = self.credentials()?;
        let mut body = serde_json::Map::new();
        for (key, value) in [
            ("grant_type", grant_type),
            ("client_id", &self.config.client_id),
            ("client_secret", secret.expose()),
            (field, credential.expose()),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            body.insert(key.to_owned(), value.into());
        }
        let request = self.http.post(self.config.token_url.clone()).json(&body);
        let (status, retry_after, bytes) = self.send(Endpoint::Token, request).await?;
        if status.is_success() {
            return parse_grant(status, &bytes);
        }
        let sent_secrets = [credential.expose(), secret.expose()];
        Err(classify_error(status, retry_after, &bytes, &sent_secrets))
    }

    /// The sites an access token reaches.
    pub async fn accessible_resources(
        &self,
        access_token: &Secret,
        now: Time,
    ) -> Result<Vec<Site>, ProviderError> {
        let url = self.api_url("oauth/token/accessible-resources");
        let (status, retry_after, bytes) = self.get(Endpoint::Resources, url, access_token).await?;
        parse_resources(status, retry_after, &bytes, now)
    }

    /// The account behind an access token; `Ok(None)` when the provider will not say (401 or
    /// 403: the app lacks `read:me` / the User Identity API), which is not a failure.
    pub async fn me(&self, access_token: &Secret) -> Result<Option<Account>, ProviderError> {
        let url = self.api_url("me");
        let (status, retry_after, bytes) = self.get(Endpoint::Me, url, access_token).await?;
        parse_me(status, retry_after, &bytes)
    }

    /// The URL of the consent screen for a new connection, with the given `state`.
    pub fn authorize_url(&self, state: &str) -> String {
        let client =
            oauth2::basic::BasicClient::new(oauth2::ClientId::new(self.config.client_id.clone()))
                .set_auth_uri(oauth2::AuthUrl::from_url(self.config.authorize_url.clone()))
                .set_redirect_uri(oauth2::RedirectUrl::from_url(
                    self.config.redirect_uri.clone(),
                ));
        let state = state.to_owned();
        let (url, _) = client
            .authorize_url(move || oauth2::CsrfToken::new(state))
            .add_scopes(
                self.config
                    .scopes
                    .iter()
                    .map(|s| oauth2::Scope::new(s.clone())),
            )
            .add_extra_param("audience", "api.atlassian.com")
            .add_extra_param("prompt", "consent")
            .url();
        url.to_string()
    }

    /// The base URL of a product API for a site: `{api_url}/ex/{product}/{cloud_id}`.
    pub fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        format!(
            "{}/ex/{product}/{cloud_id}",
            self.config.api_url.as_str().trim_end_matches('/')
        )
    }

    fn api_url(&self, path: &str) -> String {
        format!(
            "{}/{path}",
            self.config.api_url.as_str().trim_end_matches('/')
        )
    }

    /// A GET of the API gateway with an access token.
    async fn get(
        &self,
        endpoint: Endpoint,
        url: String,
        access_token: &Secret,
    ) -> Result<(StatusCode, Option<Duration>, bytes::Bytes), ProviderError> {
        let request = self.http.get(url).bearer_auth(access_token.expose());
        self.send(endpoint, request).await
    }

    /// Sends one request through the endpoint's `Retry-After` gate, which the answer's status
    /// and `Retry-After` settle; the body is read whole (reqwest's timeout bounds it).
    async fn send(
        &self,
        endpoint: Endpoint,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Option<Duration>, bytes::Bytes), ProviderError> {
        let admission = self.gates.admit(endpoint)?;
        let response = request
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        admission.settle(Some(status), retry_after);
        let bytes = response.bytes().await.map_err(transport_error)?;
        Ok((status, retry_after, bytes))
    }
}

/// A new random, unguessable `state` for the consent flow.
pub fn new_state() -> String {
    oauth2::CsrfToken::new_random().secret().clone()
}
