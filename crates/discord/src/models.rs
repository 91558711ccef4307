//! Typed Discord payloads the worker and the API read. Fields Discord may
//! leave out are `Option` or defaulted explicitly; the ones a caller cannot
//! do without (a member's `roles`, any id) are required, so a payload
//! missing them is a [`crate::Error::Decode`], never silently nothing.
//! Messages and channels are decoded by the caller into its own model
//! (the worker uses serenity's) through [`crate::Client::fetch`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Discord id: a string on the wire (leniently a number), an `i64` here
/// as PostgreSQL stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Snowflake(pub i64);

impl Snowflake {
    pub fn get(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Snowflake {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Str(String),
            Num(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Str(s) => s
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .map(Snowflake)
                .ok_or_else(|| serde::de::Error::custom(format!("not a snowflake: {s}"))),
            Raw::Num(n) if n >= 0 => Ok(Snowflake(n)),
            Raw::Num(n) => Err(serde::de::Error::custom(format!("not a snowflake: {n}"))),
        }
    }
}

impl Serialize for Snowflake {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct User {
    pub id: Snowflake,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub global_name: Option<String>,
    #[serde(default)]
    pub avatar: Option<String>,
    #[serde(default)]
    pub bot: bool,
}

/// A guild member. Discord's member objects carry no guild id; the client's
/// member calls fill [`Member::guild_id`] from the route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Member {
    #[serde(default)]
    pub guild_id: Option<Snowflake>,
    /// Absent only in member objects nested in other payloads.
    #[serde(default)]
    pub user: Option<User>,
    /// Required: a member without its roles would read as one without any.
    pub roles: Vec<Snowflake>,
    #[serde(default)]
    pub nick: Option<String>,
    #[serde(default)]
    pub joined_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub communication_disabled_until: Option<DateTime<Utc>>,
}

impl Member {
    pub fn user_id(&self) -> Option<i64> {
        self.user.as_ref().map(|u| u.id.0)
    }

    pub fn role_ids(&self) -> Vec<i64> {
        self.roles.iter().map(|r| r.0).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Role {
    pub id: Snowflake,
    #[serde(default)]
    pub name: String,
    /// A decimal bitset as a string.
    #[serde(default)]
    pub permissions: Option<String>,
    #[serde(default)]
    pub position: i64,
}

impl Role {
    /// The permission bits; none when Discord sent none or garbage (fail
    /// closed: an unreadable role grants nothing).
    pub fn permission_bits(&self) -> u64 {
        self.permissions
            .as_deref()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
    }
}

/// A guild as `/users/@me/guilds` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PartialGuild {
    pub id: Snowflake,
    #[serde(default)]
    pub name: String,
}

/// A thread member; `member` only with `with_member=true`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ThreadMember {
    /// The thread (omitted in some payloads).
    #[serde(default)]
    pub id: Option<Snowflake>,
    pub user_id: Snowflake,
    #[serde(default)]
    pub member: Option<Member>,
}

/// A page of threads (`/threads/archived/...`, `/threads/active`), with the
/// thread type of the caller's choosing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ThreadList<T> {
    pub threads: Vec<T>,
    #[serde(default)]
    pub members: Vec<ThreadMember>,
    #[serde(default)]
    pub has_more: bool,
}

/// `GET /gateway`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Gateway {
    pub url: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_member_without_roles_is_an_error_not_an_empty_member() {
        let err = serde_json::from_value::<Member>(json!({"user": {"id": "1"}})).unwrap_err();
        assert!(err.to_string().contains("roles"), "{err}");
        let m: Member = serde_json::from_value(json!({
            "user": {"id": "42", "username": "u"}, "roles": ["7", 8], "nick": null,
            "joined_at": "2026-01-01T00:00:00.000000+00:00", "flags": 0
        }))
        .unwrap();
        assert_eq!((m.user_id(), m.role_ids()), (Some(42), vec![7, 8]));
        assert!(m.guild_id.is_none() && m.joined_at.is_some());
    }

    #[test]
    fn bad_ids_and_permissions() {
        assert!(serde_json::from_value::<Snowflake>(json!("x")).is_err());
        assert!(serde_json::from_value::<Snowflake>(json!("-1")).is_err());
        let r: Role = serde_json::from_value(json!({"id": "1", "permissions": "nope"})).unwrap();
        assert_eq!(r.permission_bits(), 0);
        let r: Role =
            serde_json::from_value(json!({"id": "1", "permissions": "18446744073709551615"}))
                .unwrap();
        assert_eq!(r.permission_bits(), u64::MAX);
    }
}
