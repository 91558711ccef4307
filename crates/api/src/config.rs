//! Runtime configuration of the API (the binary maps flags/env vars onto it).

use std::time::Duration;

use secrecy::SecretString;

/// Everything the API needs besides the database handle and the listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where browsers reach the API (`PUBLIC_URL`). The OAuth redirect is
    /// `{public_url}/auth/callback`; cookies are `Secure` when it is https.
    pub public_url: String,
    /// `DISCORD_CLIENT_ID`.
    pub discord_client_id: String,
    /// `DISCORD_CLIENT_SECRET` (redacted in `Debug`; read with `expose_secret()`
    /// only where the OAuth client is built).
    pub discord_client_secret: SecretString,
    /// `DISCORD_API_BASE_URL`: REST `{base}/api/v10/...`, token
    /// `{base}/api/oauth2/token`, authorize `{base}/oauth2/authorize`.
    pub discord_api_base_url: String,
    pub limits: Limits,
    /// How long a login session lives without activity.
    pub session_ttl: Duration,
    /// How often a logged-in viewer's guild memberships are re-read from
    /// Discord with their stored OAuth token.
    pub membership_refresh_interval: Duration,
    /// Reverse proxies in front of the API that append the address they saw
    /// to `X-Forwarded-For` (`API_TRUSTED_PROXY_HOPS`). The client address
    /// for rate limits is then the entry that many places from the right;
    /// entries further left are whatever the client sent and never trusted.
    /// 0: the header is ignored and the TCP peer is the client.
    pub trusted_proxy_hops: usize,
}

/// How much larger the per-address bucket is than the per-viewer one.
pub const ADDRESS_RATE_FACTOR: u32 = 4;

/// Abuse limits (docs/interfaces.md "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Deepest accepted GraphQL selection.
    pub max_depth: usize,
    /// Largest accepted GraphQL complexity (list fields count `first` times).
    pub max_complexity: usize,
    /// Token bucket per viewer (or per client address when anonymous): burst size…
    pub rate_burst: u32,
    /// …and sustained requests per second. Every request (and WebSocket
    /// `connection_init`) also takes a token from its client address's bucket
    /// *before* any credential is looked up, so guessing API tokens is
    /// limited too; that bucket is [`ADDRESS_RATE_FACTOR`] times larger
    /// (several viewers may share an address).
    pub rate_per_sec: f64,
    /// How often a live subscription re-checks that its connection's session
    /// or API token is still valid (ended with `UNAUTHENTICATED` otherwise).
    pub auth_recheck: Duration,
    /// Most `messageEvents` subscriptions open at once on one WebSocket…
    pub max_subscriptions_per_connection: usize,
    /// …and for one viewer over all their connections (in this process).
    pub max_subscriptions_per_viewer: usize,
    /// How often a GraphQL WebSocket is pinged (a WebSocket ping, plus `ka`
    /// on the legacy protocol) so proxies keep quiet connections open.
    pub ws_keepalive: Duration,
    /// How long a new GraphQL WebSocket may take to send `connection_init`
    /// before it is closed with 4408.
    pub ws_init_timeout: Duration,
    /// Longest a GraphQL request may execute before it is abandoned (and its
    /// transaction rolled back).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_depth: 12,
            max_complexity: 2_000,
            rate_burst: 60,
            rate_per_sec: 20.0,
            request_timeout: Duration::from_secs(15),
            auth_recheck: Duration::from_secs(5),
            ws_keepalive: Duration::from_secs(20),
            ws_init_timeout: Duration::from_secs(10),
            max_subscriptions_per_connection: 16,
            max_subscriptions_per_viewer: 64,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            public_url: "http://localhost:3000".into(),
            discord_client_id: String::new(),
            discord_client_secret: SecretString::default(),
            discord_api_base_url: "https://discord.com".into(),
            limits: Limits::default(),
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            membership_refresh_interval: Duration::from_secs(10 * 60),
            trusted_proxy_hops: 0,
        }
    }
}

impl Config {
    pub(crate) fn public_url_trimmed(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }

    pub(crate) fn api_base_trimmed(&self) -> &str {
        self.discord_api_base_url.trim_end_matches('/')
    }

    pub(crate) fn redirect_url(&self) -> String {
        format!("{}/auth/callback", self.public_url_trimmed())
    }

    /// Whether cookies get `Secure`: `PUBLIC_URL` is https (the scheme is
    /// case-insensitive, which the url crate normalises).
    pub fn secure_cookies(&self) -> bool {
        url::Url::parse(self.public_url.trim()).is_ok_and(|u| u.scheme() == "https")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_client_secret() {
        let c = Config {
            discord_client_secret: "very-secret-value".into(),
            ..Config::default()
        };
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(shown.contains("discord_client_secret"), "{shown}");
    }

    #[test]
    fn secure_cookies_follow_the_public_url_scheme_in_any_case() {
        let with = |u: &str| Config {
            public_url: u.into(),
            ..Config::default()
        };
        assert!(with("https://observer.example").secure_cookies());
        assert!(with("HTTPS://Observer.Example/").secure_cookies());
        assert!(with("HttpS://observer.example:8443").secure_cookies());
        assert!(!with("http://localhost:3000").secure_cookies());
        assert!(!with("not a url").secure_cookies());
    }
}
