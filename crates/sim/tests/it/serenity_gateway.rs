//! The real serenity 0.12.5 client against the simulator's gateway.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use crate::common::{connect, intents, Seen};
use observer_sim::{
    perms, AttachmentSpec, ChannelKind, GenOptions, Overwrite, OverwriteKind, PostOptions,
    Scenario, SimConfig, Simulator,
};
use observer_testkit::wait::holds_within;
use serenity::all::GatewayIntents;

struct Org {
    sim: Simulator,
    scenario: Scenario,
}

async fn org() -> Org {
    let sim = Simulator::start(SimConfig::default())
        .await
        .expect("simulator starts");
    let scenario = Scenario::generate(11, GenOptions::default());
    sim.load(scenario.clone());
    Org { sim, scenario }
}

fn channel_named(s: &Scenario, guild: usize, name: &str) -> u64 {
    s.guilds[guild]
        .channels
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.id)
        .expect("channel exists")
}

fn customer(s: &Scenario, guild: usize) -> (u64, Vec<u64>) {
    let g = &s.guilds[guild];
    let customer_role = g
        .roles
        .iter()
        .find(|r| r.name == "Customer")
        .map(|r| r.id)
        .expect("customer role");
    let m = g
        .members
        .iter()
        .find(|m| m.roles == vec![customer_role])
        .expect("a customer");
    (m.user_id, m.roles.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_guild_create_and_message_events_arrive_typed() {
    let Org { sim, scenario } = org().await;
    let mut bot = connect(&sim, intents(), 0).await;

    // Handlers run concurrently: GUILD_CREATEs may be handled before READY.
    let boot = bot
        .collect_settled(30, 50, |all| {
            all.iter().any(|s| matches!(s, Seen::Ready { .. }))
                && all
                    .iter()
                    .filter(|s| matches!(s, Seen::GuildCreate { .. }))
                    .count()
                    >= 3
        })
        .await;
    let ready = boot
        .iter()
        .find(|s| matches!(s, Seen::Ready { .. }))
        .unwrap();
    assert!(matches!(ready, Seen::Ready { guilds: 3, .. }), "{ready:?}");
    let mut created = HashMap::new();
    for s in &boot {
        if let Seen::GuildCreate {
            id,
            channels,
            threads,
            members,
            roles,
            ..
        } = s
        {
            assert!(
                created
                    .insert(*id, (*channels, *threads, *members, *roles))
                    .is_none(),
                "each guild once"
            );
        }
    }
    for g in &scenario.guilds {
        let (channels, threads, members, roles) = created[&g.id];
        let expect_channels = g.channels.iter().filter(|c| !c.kind.is_thread()).count();
        assert_eq!(
            channels, expect_channels,
            "every channel parsed (serenity drops bad ones silently)"
        );
        let active = g
            .channels
            .iter()
            .filter(|c| c.kind.is_thread() && !c.thread.as_ref().unwrap().archived);
        assert_eq!(threads, active.count());
        // No GUILD_PRESENCES: Discord sends only the bot (and users in voice, which the
        // simulator has none of); everyone else is listed over REST.
        assert_eq!(members, 1, "only the bot's own member");
        assert_eq!(roles, g.roles.len());
    }

    let ch = channel_named(&scenario, 0, "general-help");
    let (author, roles) = customer(&scenario, 0);
    let m = sim
        .post_message(
            ch,
            author,
            "hello from a customer",
            PostOptions {
                attachments: vec![AttachmentSpec {
                    filename: "a.png".into(),
                    size: 10,
                    content_type: Some("image/png".into()),
                }],
                reply_to: None,
            },
        )
        .unwrap();
    let got = bot
        .wait_for(10, |s| matches!(s, Seen::Message { id, .. } if *id == m.id))
        .await;
    assert_eq!(
        got,
        Seen::Message {
            id: m.id,
            channel_id: ch,
            content: "hello from a customer".into(),
            member_roles: Some(roles),
            attachments: 1
        }
    );

    sim.edit_message(m.id, "edited").unwrap();
    let got = bot.wait_for(10, |s| matches!(s, Seen::Update { .. })).await;
    assert_eq!(
        got,
        Seen::Update {
            id: m.id,
            content: Some("edited".into())
        }
    );

    sim.partial_message_updates(true);
    sim.edit_message(m.id, "edited twice").unwrap();
    let got = bot.wait_for(10, |s| matches!(s, Seen::Update { .. })).await;
    assert_eq!(
        got,
        Seen::Update {
            id: m.id,
            content: Some("edited twice".into())
        }
    );

    sim.delete_message(m.id).unwrap();
    assert_eq!(
        bot.wait_for(10, |s| matches!(s, Seen::Delete { .. })).await,
        Seen::Delete { id: m.id }
    );

    let a = sim
        .post_message(ch, author, "one", PostOptions::default())
        .unwrap();
    let b = sim
        .post_message(ch, author, "two", PostOptions::default())
        .unwrap();
    sim.bulk_delete(ch, &[a.id, b.id]).unwrap();
    assert_eq!(
        bot.wait_for(10, |s| matches!(s, Seen::DeleteBulk { .. }))
            .await,
        Seen::DeleteBulk {
            ids: vec![a.id, b.id]
        }
    );

    // Access-related mutations: each must parse as its typed event (none may become Unknown).
    let g = &scenario.guilds[0];
    let staff_role = g.roles.iter().find(|r| r.name == "Staff").unwrap().id;
    sim.set_role_permissions(
        g.id,
        staff_role,
        perms::VIEW_CHANNEL | perms::MANAGE_MESSAGES,
    )
    .unwrap();
    sim.set_member_roles(g.id, author, vec![staff_role])
        .unwrap();
    sim.set_overwrite(
        ch,
        Overwrite {
            id: g.id,
            kind: OverwriteKind::Role,
            allow: 0,
            deny: perms::VIEW_CHANNEL,
        },
    )
    .unwrap();
    sim.remove_overwrite(ch, g.id).unwrap();
    sim.timeout_member(
        g.id,
        author,
        Some(chrono::Utc::now() + chrono::Duration::hours(1)),
    )
    .unwrap();
    let forum = channel_named(&scenario, 0, "tickets");
    let thread = sim
        .create_thread(forum, "Ticket: printer on fire", author, false)
        .unwrap();
    sim.add_thread_member(thread.id, scenario.guilds[0].owner_id)
        .unwrap();
    sim.remove_thread_member(thread.id, scenario.guilds[0].owner_id)
        .unwrap();
    let private = sim
        .create_thread(
            channel_named(&scenario, 0, "escalations"),
            "secret",
            author,
            true,
        )
        .unwrap();
    assert_eq!(private.kind, ChannelKind::PrivateThread);
    sim.delete_thread(thread.id).unwrap();
    let role = sim
        .create_role(
            g.id,
            observer_sim::Role {
                id: 0,
                name: "VIP".into(),
                permissions: 0,
                position: 1,
                color: 0,
                hoist: false,
                mentionable: false,
            },
        )
        .unwrap();
    sim.delete_role(g.id, role.id).unwrap();
    let new_channel = sim
        .create_channel(
            g.id,
            observer_sim::Channel {
                id: 0,
                kind: ChannelKind::Text,
                name: "new-room".into(),
                parent_id: None,
                position: 9,
                topic: None,
                overwrites: vec![],
                thread: None,
                available_tags: vec![],
            },
        )
        .unwrap();
    sim.delete_channel(new_channel.id).unwrap();
    let leaver = g
        .members
        .iter()
        .find(|m| m.user_id != author && m.user_id != g.owner_id)
        .unwrap()
        .user_id;
    sim.remove_member(g.id, leaver).unwrap();
    sim.add_member(g.id, leaver, vec![]).unwrap();
    sim.remove_bot_from_guild(g.id).unwrap();
    assert_eq!(
        bot.wait_for(10, |s| matches!(s, Seen::GuildDelete { .. }))
            .await,
        Seen::GuildDelete {
            id: g.id,
            unavailable: false
        }
    );
    // Messages in a guild the bot left are not dispatched.
    let ch2 = channel_named(&scenario, 1, "general-help");
    let (author2, _) = customer(&scenario, 1);
    sim.post_message(ch, author, "invisible", PostOptions::default())
        .unwrap();
    let last = sim
        .post_message(ch2, author2, "visible", PostOptions::default())
        .unwrap();
    let rest = bot
        .collect_until(
            10,
            |s| matches!(s, Seen::Message { id, .. } if *id == last.id),
        )
        .await;
    assert!(!rest
        .iter()
        .any(|s| matches!(s, Seen::Message { content, .. } if content == "invisible")));

    let expected = [
        "GUILD_ROLE_UPDATE",
        "GUILD_MEMBER_UPDATE",
        "CHANNEL_UPDATE",
        "THREAD_CREATE",
        "THREAD_MEMBERS_UPDATE",
        "THREAD_DELETE",
        "GUILD_ROLE_CREATE",
        "GUILD_ROLE_DELETE",
        "CHANNEL_CREATE",
        "CHANNEL_DELETE",
        "GUILD_MEMBER_REMOVE",
        "GUILD_MEMBER_ADD",
        "GUILD_DELETE",
        "MESSAGE_DELETE_BULK",
        "READY",
    ];
    assert!(
        holds_within(Duration::from_secs(10), || {
            let n = bot.raw_names();
            expected.iter().all(|e| n.iter().any(|x| x == e))
        })
        .await,
        "typed raw events missing: have {:?}",
        bot.raw_names()
    );
    assert_eq!(
        bot.unknown(),
        Vec::<String>::new(),
        "no event degraded to Event::Unknown"
    );

    // The malformed-payload fault is exactly what turns into Event::Unknown.
    sim.send_malformed();
    assert!(
        holds_within(Duration::from_secs(10), || bot.unknown()
            == vec!["MESSAGE_CREATE".to_string()])
        .await,
        "{:?}",
        bot.unknown()
    );
    bot.stop().await;
    sim.shutdown().await;
}

fn contents(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Message { content, .. } => Some(content.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op7_resumes_and_replays_missed_events_exactly_once() {
    let Org { sim, scenario } = org().await;
    let mut bot = connect(&sim, intents(), 0).await;
    let ch = channel_named(&scenario, 0, "general-help");
    let (author, _) = customer(&scenario, 0);
    let first = bot.wait_for(20, |s| matches!(s, Seen::Ready { .. })).await;

    let m0 = sim
        .post_message(ch, author, "before", PostOptions::default())
        .unwrap();
    bot.wait_for(
        10,
        |s| matches!(s, Seen::Message { id, .. } if *id == m0.id),
    )
    .await;

    // op 7 followed at once by traffic: whatever the old socket did not deliver must be replayed.
    sim.send_reconnect();
    let mut posted = vec![];
    for i in 0..20 {
        posted.push(
            sim.post_message(ch, author, format!("during {i}"), PostOptions::default())
                .unwrap()
                .content,
        );
    }
    let mut seen = bot.collect_until(20, |s| matches!(s, Seen::Resumed)).await;
    let _after = sim
        .post_message(ch, author, "after", PostOptions::default())
        .unwrap();
    // Everything "during" may have arrived before RESUMED (old socket) or as replay; collect
    // both, then wait for quiet so a late duplicate would be caught.
    let more = bot
        .collect_settled(20, 500, |new| {
            let c: Vec<String> = contents(&seen).into_iter().chain(contents(new)).collect();
            c.iter().any(|x| x == "after") && posted.iter().all(|p| c.contains(p))
        })
        .await;
    seen.extend(more);
    let all = contents(&seen);
    for p in &posted {
        assert_eq!(
            all.iter().filter(|c| *c == p).count(),
            1,
            "{p:?} seen exactly once in {all:?}"
        );
    }
    assert_eq!(all.iter().filter(|c| *c == "after").count(), 1);
    assert!(
        !seen.iter().any(|s| matches!(s, Seen::Ready { .. })),
        "resumed, not re-identified"
    );
    assert_eq!(sim.session_counts(), (1, 1));
    // (Whether these were replayed or arrived live depends on timing; the raw-socket test in
    // gateway_protocol.rs pins the replay itself down deterministically.)
    assert!(matches!(first, Seen::Ready { .. }));
    assert_eq!(bot.unknown(), Vec::<String>::new());
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_socket_resumes_with_events_sent_while_disconnected() {
    let Org { sim, scenario } = org().await;
    let mut bot = connect(&sim, intents(), 0).await;
    let ch = channel_named(&scenario, 0, "billing");
    let (author, _) = customer(&scenario, 0);
    bot.wait_for(20, |s| matches!(s, Seen::Ready { .. })).await;
    sim.drop_connections();
    assert!(
        holds_within(Duration::from_secs(10), || sim.session_counts().1 == 0
            || sim.session_counts().1 == 1)
        .await
    );
    let mut posted = vec![];
    for i in 0..5 {
        posted.push(
            sim.post_message(
                ch,
                author,
                format!("while down {i}"),
                PostOptions::default(),
            )
            .unwrap()
            .id,
        );
    }
    let seen = bot.collect_until(30, |s| matches!(s, Seen::Resumed)).await;
    let last = sim
        .post_message(ch, author, "after", PostOptions::default())
        .unwrap();
    let mut all = seen;
    let more = bot
        .collect_settled(20, 500, |new| {
            let ids: Vec<u64> = all
                .iter()
                .chain(new)
                .filter_map(|s| match s {
                    Seen::Message { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            ids.contains(&last.id) && posted.iter().all(|p| ids.contains(p))
        })
        .await;
    all.extend(more);
    for id in posted {
        assert_eq!(
            all.iter()
                .filter(|s| matches!(s, Seen::Message { id: i, .. } if *i == id))
                .count(),
            1
        );
    }
    assert!(!all.iter().any(|s| matches!(s, Seen::Ready { .. })));
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op9_false_makes_serenity_identify_again() {
    let Org { sim, scenario } = org().await;
    let mut bot = connect(&sim, intents(), 0).await;
    let first = bot.wait_for(20, |s| matches!(s, Seen::Ready { .. })).await;
    sim.invalidate_sessions(false);
    let second = bot.wait_for(30, |s| matches!(s, Seen::Ready { .. })).await;
    let (Seen::Ready { session_id: a, .. }, Seen::Ready { session_id: b, .. }) = (first, second)
    else {
        unreachable!()
    };
    assert_ne!(a, b, "a new session");
    let ch = channel_named(&scenario, 0, "general-help");
    let (author, _) = customer(&scenario, 0);
    let m = sim
        .post_message(ch, author, "after re-identify", PostOptions::default())
        .unwrap();
    bot.wait_for(10, |s| matches!(s, Seen::Message { id, .. } if *id == m.id))
        .await;
    assert_eq!(sim.session_counts(), (1, 1));
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_privileged_intents_close_with_4014() {
    let sim = Simulator::start(SimConfig {
        privileged_intents: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let bot = connect(&sim, intents(), 0).await;
    let res = tokio::time::timeout(std::time::Duration::from_secs(20), bot.run)
        .await
        .expect("client stops");
    let err = res
        .expect("task joins")
        .expect_err("serenity reports the failure");
    assert!(
        format!("{err:?}").contains("DisallowedGatewayIntents"),
        "{err:?}"
    );

    // Without the privileged intents the same simulator accepts the connection.
    let mut bot = connect(
        &sim,
        GatewayIntents::GUILDS | GatewayIntents::GUILD_MESSAGES,
        0,
    )
    .await;
    bot.wait_for(20, |s| matches!(s, Seen::Ready { .. })).await;
    bot.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guilds_are_split_across_shards() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let scenario = Scenario::generate(
        5,
        GenOptions {
            guilds: 6,
            ..GenOptions::default()
        },
    );
    sim.load(scenario.clone());
    let mut bot = connect(&sim, intents(), 2).await;
    let mut by_shard: HashMap<u64, u32> = HashMap::new();
    while by_shard.len() < 6 {
        if let Seen::GuildCreate { id, shard, .. } = bot
            .wait_for(30, |s| matches!(s, Seen::GuildCreate { .. }))
            .await
        {
            assert!(by_shard.insert(id, shard).is_none(), "each guild once");
        }
    }
    for (id, shard) in by_shard {
        assert_eq!(u64::from(shard), (id >> 22) % 2);
    }
    bot.stop().await;
    sim.shutdown().await;
}
