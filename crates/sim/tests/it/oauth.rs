//! OAuth2 end to end with the `oauth2` crate (BasicClient + PKCE) against the simulator.
#![allow(clippy::unwrap_used)]

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use observer_sim::{GenOptions, Scenario, SimConfig, Simulator};
use serde_json::Value;

const REDIRECT: &str = "http://127.0.0.1:9/auth/callback";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn setup() -> (Simulator, Scenario) {
    let sim = Simulator::start(SimConfig {
        redirect_uris: vec![REDIRECT.into()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = Scenario::generate(8, GenOptions::default());
    sim.load(s.clone());
    (sim, s)
}

macro_rules! client {
    ($sim:expr, $secret:expr, $redirect:expr) => {
        BasicClient::new(ClientId::new($sim.config().client_id.clone()))
            .set_client_secret(ClientSecret::new($secret.to_string()))
            .set_auth_uri(AuthUrl::new(format!("{}/oauth2/authorize", $sim.base_url())).unwrap())
            .set_token_uri(TokenUrl::new(format!("{}/api/oauth2/token", $sim.base_url())).unwrap())
            .set_redirect_uri(RedirectUrl::new($redirect.to_string()).unwrap())
    };
}

/// Runs the browser half: authorize as `user` (non-interactive), returns (code, state).
async fn authorize(url: &url::Url, user: u64) -> (String, String) {
    let res = no_redirects()
        .get(format!("{url}&login_as={user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302, "redirects back to the app");
    let loc = url::Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
    assert!(loc.as_str().starts_with(REDIRECT));
    let q: std::collections::HashMap<_, _> = loc.query_pairs().into_owned().collect();
    (q["code"].clone(), q["state"].clone())
}

#[tokio::test]
async fn pkce_login_scopes_refresh_and_revoke() {
    let (sim, s) = setup().await;
    let user = s.guilds[0]
        .members
        .iter()
        .find(|m| m.user_id != s.guilds[0].owner_id)
        .unwrap()
        .user_id;
    let client = client!(sim, sim.config().client_secret, REDIRECT);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("identify".into()))
        .add_scope(Scope::new("guilds".into()))
        .set_pkce_challenge(challenge)
        .url();

    // The interactive page lists the simulated users (escaped HTML, no scripts).
    let page = reqwest::get(url.as_str())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&s.users[0].username) && page.contains("login_as="),
        "{page}"
    );

    let (code, state) = authorize(&url, user).await;
    assert_eq!(&state, csrf.secret());
    let http = no_redirects();
    let token = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(token.scopes().unwrap().len(), 2);
    let bearer = token.access_token().secret().clone();

    let me: Value = http
        .get(format!("{}/api/v10/users/@me", sim.base_url()))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], user.to_string());
    let guilds: Value = http
        .get(format!("{}/api/v10/users/@me/guilds", sim.base_url()))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = s
        .guilds
        .iter()
        .filter(|g| g.members.iter().any(|m| m.user_id == user))
        .count();
    assert_eq!(guilds.as_array().unwrap().len(), expected);
    assert!(guilds[0]["permissions"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    // No guilds.members.read scope → the member endpoint refuses.
    let member_url = format!(
        "{}/api/v10/users/@me/guilds/{}/member",
        sim.base_url(),
        s.guilds[0].id
    );
    let res = http
        .get(&member_url)
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // A code is single use.
    let again = client
        .exchange_code(AuthorizationCode::new(code))
        .request_async(&http)
        .await;
    assert!(
        matches!(again, Err(RequestTokenError::ServerResponse(ref e)) if *e.error() == BasicErrorResponseType::InvalidGrant)
    );

    // Refresh: new tokens, old access token dead.
    let refreshed = client
        .exchange_refresh_token(token.refresh_token().unwrap())
        .request_async(&http)
        .await
        .unwrap();
    let res = http
        .get(format!("{}/api/v10/users/@me", sim.base_url()))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let new_bearer = refreshed.access_token().secret().clone();
    let res = http
        .get(format!("{}/api/v10/users/@me", sim.base_url()))
        .bearer_auth(&new_bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Revoke (client auth in the form body this time).
    let res = http
        .post(format!("{}/api/oauth2/token/revoke", sim.base_url()))
        .form(&[
            ("token", new_bearer.as_str()),
            ("client_id", &sim.config().client_id),
            ("client_secret", &sim.config().client_secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .get(format!("{}/api/v10/users/@me", sim.base_url()))
        .bearer_auth(&new_bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    sim.shutdown().await;
}

#[tokio::test]
async fn member_scope_and_form_client_auth() {
    let (sim, s) = setup().await;
    let g = &s.guilds[0];
    let m = g.members.iter().find(|m| !m.roles.is_empty()).unwrap();
    let client =
        client!(sim, sim.config().client_secret, REDIRECT).set_auth_type(AuthType::RequestBody);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("identify".into()))
        .add_scope(Scope::new("guilds.members.read".into()))
        .set_pkce_challenge(challenge)
        .url();
    let (code, _) = authorize(&url, m.user_id).await;
    let http = no_redirects();
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let member: Value = http
        .get(format!(
            "{}/api/v10/users/@me/guilds/{}/member",
            sim.base_url(),
            g.id
        ))
        .bearer_auth(token.access_token().secret())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let roles: Vec<String> = m.roles.iter().map(|r| r.to_string()).collect();
    assert_eq!(member["roles"], serde_json::json!(roles));
    // Without the guilds scope, the guild list is refused.
    let res = http
        .get(format!("{}/api/v10/users/@me/guilds", sim.base_url()))
        .bearer_auth(token.access_token().secret())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_verifier_redirect_or_secret_fail() {
    let (sim, s) = setup().await;
    let user = s.users[0].id;
    let http = no_redirects();
    let good = client!(sim, sim.config().client_secret, REDIRECT);

    // Wrong PKCE verifier.
    let (challenge, _verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = good
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("identify".into()))
        .set_pkce_challenge(challenge)
        .url();
    let (code, _) = authorize(&url, user).await;
    let res = good
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new("x".repeat(64)))
        .request_async(&http)
        .await;
    assert!(
        matches!(res, Err(RequestTokenError::ServerResponse(ref e)) if *e.error() == BasicErrorResponseType::InvalidGrant),
        "{res:?}"
    );

    // Missing verifier when a challenge was sent.
    let (challenge, _) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = good
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge)
        .url();
    let (code, _) = authorize(&url, user).await;
    assert!(good
        .exchange_code(AuthorizationCode::new(code))
        .request_async(&http)
        .await
        .is_err());

    // Redirect URI at the token step differs from the authorize one.
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = good
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge)
        .url();
    let (code, _) = authorize(&url, user).await;
    let other = client!(
        sim,
        sim.config().client_secret,
        "http://127.0.0.1:9/elsewhere"
    );
    let res = other
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await;
    assert!(
        matches!(res, Err(RequestTokenError::ServerResponse(ref e)) if *e.error() == BasicErrorResponseType::InvalidGrant),
        "{res:?}"
    );

    // An unregistered redirect URI is refused at authorize time, without redirecting.
    let (url, _) = other.authorize_url(CsrfToken::new_random).url();
    let res = http
        .get(format!("{url}&login_as={user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // Wrong client secret.
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = good
        .authorize_url(CsrfToken::new_random)
        .set_pkce_challenge(challenge)
        .url();
    let (code, _) = authorize(&url, user).await;
    let bad = client!(sim, "not-the-secret", REDIRECT);
    let res = bad
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await;
    assert!(
        matches!(res, Err(RequestTokenError::ServerResponse(ref e)) if *e.error() == BasicErrorResponseType::InvalidClient),
        "{res:?}"
    );

    // JSON bodies are not accepted by the token endpoint.
    let res = http
        .post(format!("{}/api/oauth2/token", sim.base_url()))
        .json(&serde_json::json!({"grant_type": "authorization_code", "code": "x"}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_client_error());
    sim.shutdown().await;
}
