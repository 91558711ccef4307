//! Tenant isolation through the API: for random small scenarios (seeded,
//! seed printed on failure), what each viewer reads through GraphQL —
//! `guilds`, their `channels`, `channel`, `messages`, `message` and
//! `searchMessages` — equals the access rule (`observer_db::access`, itself
//! held equal to an independent Discord reference by the db crate's property
//! test), and hidden ids answer exactly like nonexistent ones.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use crate::common::*;
use chrono::Utc;
use observer_db::access::{
    self, perms, ChannelData, GuildAccessData, MemberData, Overwrite, OverwriteKind,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::PgPool;

const USERS: i64 = 6;
const SCENARIOS: u64 = 6;

struct World {
    guilds: Vec<GuildAccessData>,
    members: BTreeMap<(i64, i64), MemberData>,
    /// channel id → message ids
    messages: BTreeMap<i64, Vec<i64>>,
}

fn random_perms(rng: &mut StdRng) -> u64 {
    let mut p = 0;
    for bit in [
        perms::VIEW_CHANNEL,
        perms::READ_MESSAGE_HISTORY,
        perms::MANAGE_THREADS,
        perms::CONNECT,
    ] {
        if rng.gen_bool(0.4) {
            p |= bit;
        }
    }
    if rng.gen_bool(0.05) {
        p |= perms::ADMINISTRATOR;
    }
    p
}

fn generate(seed: u64) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut guilds = Vec::new();
    let mut members = BTreeMap::new();
    let mut messages = BTreeMap::new();
    let mut next_msg = 1_000_000;
    for g in 0..3i64 {
        let guild_id = 10_000 * (g + 1);
        let mut roles = BTreeMap::new();
        let everyone = if rng.gen_bool(0.8) {
            perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY
        } else {
            random_perms(&mut rng)
        };
        roles.insert(guild_id, everyone);
        let role_ids: Vec<i64> = (1..=3).map(|r| guild_id + r).collect();
        for r in &role_ids {
            roles.insert(*r, random_perms(&mut rng));
        }
        let targets = |rng: &mut StdRng| -> Vec<Overwrite> {
            let mut ows = Vec::new();
            let mut used = BTreeSet::new();
            for _ in 0..rng.gen_range(0..4) {
                let (target_id, kind) = match rng.gen_range(0..3) {
                    0 => (guild_id, OverwriteKind::Role),
                    1 => (
                        role_ids[rng.gen_range(0..role_ids.len())],
                        OverwriteKind::Role,
                    ),
                    _ => (rng.gen_range(1..=USERS), OverwriteKind::Member),
                };
                if !used.insert((target_id, kind == OverwriteKind::Member)) {
                    continue;
                }
                let allow = random_perms(rng) & !perms::ADMINISTRATOR;
                let deny = random_perms(rng) & !perms::ADMINISTRATOR & !allow;
                ows.push(Overwrite {
                    target_id,
                    kind,
                    allow,
                    deny,
                });
            }
            ows
        };
        let mut channels = BTreeMap::new();
        let cat = guild_id + 100;
        channels.insert(
            cat,
            ChannelData {
                channel_id: cat,
                kind: 4,
                parent_id: None,
                overwrites: targets(&mut rng),
            },
        );
        let mut texts = Vec::new();
        for c in 1..=3 {
            let id = guild_id + 100 + c;
            let kind = if c == 3 { 15 } else { 0 };
            let parent = rng.gen_bool(0.5).then_some(cat);
            channels.insert(
                id,
                ChannelData {
                    channel_id: id,
                    kind,
                    parent_id: parent,
                    overwrites: targets(&mut rng),
                },
            );
            texts.push(id);
        }
        // Voice and stage channels have text chat too; it needs CONNECT.
        for (id, kind) in [(guild_id + 110, 2), (guild_id + 111, 13)] {
            channels.insert(
                id,
                ChannelData {
                    channel_id: id,
                    kind,
                    parent_id: rng.gen_bool(0.5).then_some(cat),
                    overwrites: targets(&mut rng),
                },
            );
        }
        let public_thread = guild_id + 201;
        let private_thread = guild_id + 202;
        channels.insert(
            public_thread,
            ChannelData {
                channel_id: public_thread,
                kind: 11,
                parent_id: Some(texts[2]),
                overwrites: vec![],
            },
        );
        channels.insert(
            private_thread,
            ChannelData {
                channel_id: private_thread,
                kind: 12,
                parent_id: Some(texts[0]),
                overwrites: vec![],
            },
        );
        let owner_id = if rng.gen_bool(0.3) {
            rng.gen_range(1..=USERS)
        } else {
            999
        };
        let observer_role_ids = if rng.gen_bool(0.3) {
            vec![role_ids[rng.gen_range(0..role_ids.len())]]
        } else {
            vec![]
        };
        for u in 1..=USERS {
            if !rng.gen_bool(0.75) {
                continue;
            }
            let role_ids: Vec<i64> = role_ids
                .iter()
                .copied()
                .filter(|_| rng.gen_bool(0.4))
                .collect();
            let timeout = rng
                .gen_bool(0.15)
                .then(|| Utc::now() + chrono::Duration::hours(1));
            let mut thread_ids = BTreeSet::new();
            if rng.gen_bool(0.4) {
                thread_ids.insert(private_thread);
            }
            members.insert(
                (guild_id, u),
                MemberData {
                    user_id: u,
                    role_ids,
                    communication_disabled_until: timeout,
                    thread_ids,
                },
            );
        }
        for (&id, c) in &channels {
            if c.kind == 4 || c.kind == 15 {
                continue;
            }
            let ids: Vec<i64> = (0..2)
                .map(|_| {
                    next_msg += 1;
                    next_msg
                })
                .collect();
            messages.insert(id, ids);
        }
        guilds.push(GuildAccessData {
            guild_id,
            owner_id,
            observer_role_ids,
            removed: rng.gen_bool(0.1),
            roles,
            channels,
        });
    }
    World {
        guilds,
        members,
        messages,
    }
}

async fn load(pool: &PgPool, w: &World) {
    sqlx::query("truncate guilds, channels, permission_overwrites, roles, members, thread_members, messages, message_revisions, message_events, access_events")
        .execute(pool)
        .await
        .unwrap();
    for g in &w.guilds {
        sqlx::query("insert into guilds (guild_id, name, owner_id, observer_role_ids, removed_at) values ($1, $2, $3, $4, case when $5 then now() end)")
            .bind(g.guild_id)
            .bind(format!("guild {}", g.guild_id))
            .bind(g.owner_id)
            .bind(&g.observer_role_ids)
            .bind(g.removed)
            .execute(pool)
            .await
            .unwrap();
        for (&r, &p) in &g.roles {
            role(pool, g.guild_id, r, p).await;
        }
        for c in g.channels.values() {
            channel(
                pool,
                g.guild_id,
                c.channel_id,
                c.kind,
                c.parent_id,
                &format!("c{}", c.channel_id),
            )
            .await;
            for o in &c.overwrites {
                let kind = if o.kind == OverwriteKind::Role { 0 } else { 1 };
                overwrite(
                    pool,
                    g.guild_id,
                    c.channel_id,
                    o.target_id,
                    kind,
                    o.allow,
                    o.deny,
                )
                .await;
            }
            for &m in w.messages.get(&c.channel_id).into_iter().flatten() {
                message(
                    pool,
                    g.guild_id,
                    c.channel_id,
                    m,
                    1,
                    &format!("common words in channel {}", c.channel_id),
                )
                .await;
            }
        }
    }
    for (&(g, u), m) in &w.members {
        sqlx::query("insert into members (guild_id, user_id, role_ids, communication_disabled_until) values ($1, $2, $3, $4)")
            .bind(g)
            .bind(u)
            .bind(&m.role_ids)
            .bind(m.communication_disabled_until)
            .execute(pool)
            .await
            .unwrap();
        for t in &m.thread_ids {
            thread_member(pool, g, *t, u).await;
        }
    }
}

fn id_set(v: &Value, path: &[&str]) -> BTreeSet<i64> {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn every_viewer_reads_exactly_what_the_access_rule_allows(pool: PgPool) {
    let mut cfg = config();
    cfg.limits.rate_burst = 1_000_000;
    cfg.limits.rate_per_sec = 1_000_000.0;
    let api = start(pool.clone(), cfg).await;
    let mut tokens = BTreeMap::new();
    for u in 1..=USERS {
        create_user(&api.db, u, &format!("user{u}")).await;
        tokens.insert(u, token_for(&api.db, u).await);
    }
    let base_seed: u64 = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    for i in 0..SCENARIOS {
        let seed = base_seed.wrapping_add(i);
        let w = generate(seed);
        load(&pool, &w).await;
        let now = Utc::now();
        for (&u, token) in &tokens {
            let ctx = format!("seed {seed} (ISOLATION_SEED={base_seed}), viewer {u}");
            let mut exp_guilds = BTreeSet::new();
            let mut exp_view = BTreeMap::new();
            let mut exp_hist = BTreeSet::new();
            for g in &w.guilds {
                let visible = access::visible_channels(g, w.members.get(&(g.guild_id, u)), now);
                if !visible.is_empty() {
                    exp_guilds.insert(g.guild_id);
                }
                let set: BTreeSet<i64> = visible.keys().copied().collect();
                exp_hist.extend(visible.iter().filter(|(_, a)| a.history).map(|(c, _)| *c));
                exp_view.insert(g.guild_id, set);
            }

            let d = gql(
                &api.base,
                token,
                "{ guilds { id channels { id } } }",
                json!({}),
            )
            .await;
            assert_eq!(id_set(&d, &["guilds"]), exp_guilds, "{ctx}: guilds");
            for g in d["guilds"].as_array().unwrap() {
                let gid: i64 = g["id"].as_str().unwrap().parse().unwrap();
                assert_eq!(
                    id_set(g, &["channels"]),
                    exp_view[&gid],
                    "{ctx}: channels of {gid}"
                );
            }

            let expected_msgs: BTreeSet<i64> = exp_hist
                .iter()
                .flat_map(|c| w.messages.get(c).into_iter().flatten().copied())
                .collect();
            let d = gql(&api.base, token, "{ searchMessages(query: \"common words\", first: 100) { edges { node { id } } pageInfo { hasNextPage } } }", json!({})).await;
            let found: BTreeSet<i64> = d["searchMessages"]["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"]["id"].as_str().unwrap().parse().unwrap())
                .collect();
            assert_eq!(found, expected_msgs, "{ctx}: search");

            let none_channel = gql_raw(&api.base, Some(token), "query($c: ID!) { channel(id: $c) { id } messages(channelId: $c) { edges { node { id } } } }", json!({"c": "424242"})).await;
            for g in &w.guilds {
                for &c in g.channels.keys() {
                    let viewable = exp_view[&g.guild_id].contains(&c);
                    let r = gql_raw(&api.base, Some(token), "query($c: ID!) { channel(id: $c) { id } messages(channelId: $c) { edges { node { id } } } }", json!({"c": c.to_string()})).await;
                    if viewable {
                        assert!(r.1.get("errors").is_none(), "{ctx}: channel {c}: {}", r.1);
                        let ids: BTreeSet<i64> = r.1["data"]["messages"]["edges"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|e| e["node"]["id"].as_str().unwrap().parse().unwrap())
                            .collect();
                        let exp: BTreeSet<i64> = if exp_hist.contains(&c) {
                            w.messages.get(&c).into_iter().flatten().copied().collect()
                        } else {
                            BTreeSet::new()
                        };
                        assert_eq!(ids, exp, "{ctx}: history of {c}");
                    } else {
                        // Hidden: byte-for-byte the answer for an id that does not exist.
                        let normalised = r.1.to_string().replace(&format!("\"{c}\""), "\"424242\"");
                        assert_eq!(
                            normalised,
                            none_channel.1.to_string(),
                            "{ctx}: hidden channel {c}"
                        );
                        assert_eq!(r.0, none_channel.0);
                    }
                    for &m in w.messages.get(&c).into_iter().flatten() {
                        let d = gql(
                            &api.base,
                            token,
                            "query($m: ID!) { message(id: $m) { id } }",
                            json!({"m": m.to_string()}),
                        )
                        .await;
                        assert_eq!(
                            d["message"].is_null(),
                            !exp_hist.contains(&c),
                            "{ctx}: message {m} in {c}"
                        );
                    }
                }
            }
        }
    }
}
