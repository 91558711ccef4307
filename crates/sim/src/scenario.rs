//! `Scenario::generate`: a reproducible support organisation — several guilds with staff,
//! moderator and customer roles, a private staff category, a forum of ticket threads, private
//! escalation threads, and overwrites of every kind.

use chrono::{TimeZone, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{
    perms, snowflake_at, snowflake_time, Channel, ChannelKind, ForumTag, Guild, Member, Overwrite,
    OverwriteKind, Role, Scenario, ThreadInfo, User,
};

/// Size of a generated scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct GenOptions {
    pub guilds: usize,
    pub users: usize,
    /// Staff members per guild (besides the owner); one of them is also a moderator.
    pub staff_per_guild: usize,
    /// Ticket threads created in each guild's forum.
    pub tickets_per_guild: usize,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            guilds: 3,
            users: 24,
            staff_per_guild: 3,
            tickets_per_guild: 3,
        }
    }
}

const FIRST: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "ursula", "victor", "wendy", "xavier",
    "yolanda", "zoe", "amir", "bea", "chen", "dara", "emeka", "farah", "goran", "hana", "ilse",
];

const GUILDS: &[&str] = &[
    "Acme Support",
    "Nimbus Cloud Help",
    "Pixel Forge Community",
    "Orbit Payments Help",
    "Lumen Analytics",
    "Harbor DevTools",
    "Quill Docs Support",
    "Beacon Hosting",
];

const TICKETS: &[&str] = &[
    "Login loop after password reset",
    "Invoice shows wrong VAT",
    "API returns 502 on upload",
    "Cannot invite teammates",
    "Webhook retries never stop",
    "Export to CSV is empty",
    "Dark mode breaks charts",
    "SSO with Okta fails",
    "Refund for duplicate charge",
];

struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u64 {
        self.0 += 1 << 22;
        self.0
    }
}

fn ow(id: u64, kind: OverwriteKind, allow: u64, deny: u64) -> Overwrite {
    Overwrite {
        id,
        kind,
        allow,
        deny,
    }
}

fn text(
    id: u64,
    name: &str,
    parent: Option<u64>,
    position: i32,
    overwrites: Vec<Overwrite>,
) -> Channel {
    Channel {
        id,
        kind: ChannelKind::Text,
        name: name.into(),
        parent_id: parent,
        position,
        topic: None,
        overwrites,
        thread: None,
        available_tags: vec![],
    }
}

impl Scenario {
    /// Builds a realistic support organisation; the same seed gives the same scenario.
    pub fn generate(seed: u64, opts: GenOptions) -> Scenario {
        // Sizes may come from the HTTP control API: keep absurd requests from exhausting memory.
        let opts = GenOptions {
            guilds: opts.guilds.clamp(1, 1_000),
            users: opts.users.min(200_000),
            staff_per_guild: opts.staff_per_guild.min(1_000),
            tickets_per_guild: opts.tickets_per_guild.min(10_000),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Ids start on 2024-01-01 so they sort before anything created live.
        let mut ids = Ids(snowflake_at(1_704_067_200_000));
        let users = generate_users(&mut ids, &opts);
        // Ids and random draws are taken in a fixed order (users, then guild by
        // guild: roles, members, channels): the same seed must give the same world.
        let guilds = (0..opts.guilds.max(1))
            .map(|gi| generate_guild(gi, &users, &opts, &mut ids, &mut rng))
            .collect();
        Scenario { users, guilds }
    }
}

fn generate_users(ids: &mut Ids, opts: &GenOptions) -> Vec<User> {
    let n_users = opts.users.max(opts.staff_per_guild + 3).max(4);
    (0..n_users)
        .map(|i| {
            let name = FIRST[i % FIRST.len()];
            let username = if i < FIRST.len() {
                name.to_string()
            } else {
                format!("{name}{}", i / FIRST.len())
            };
            let mut display = username.clone();
            if let Some(f) = display.get_mut(0..1) {
                f.make_ascii_uppercase();
            }
            User {
                id: ids.next(),
                username,
                global_name: Some(display),
                avatar: None,
                bot: false,
            }
        })
        .collect()
}

/// The roles of one guild (the guild's own id is `@everyone`'s).
#[derive(Clone, Copy)]
struct GuildRoles {
    admin: u64,
    moderator: u64,
    staff: u64,
    customer: u64,
    /// The bot's own managed role: what an install link with these permissions creates.
    observer: u64,
}

impl GuildRoles {
    fn new(ids: &mut Ids) -> Self {
        let (admin, moderator, staff, customer) = (ids.next(), ids.next(), ids.next(), ids.next());
        GuildRoles {
            admin,
            moderator,
            staff,
            customer,
            observer: ids.next(),
        }
    }

    fn roles(&self, gid: u64) -> Vec<Role> {
        let GuildRoles {
            admin,
            moderator,
            staff,
            customer,
            observer,
        } = *self;
        vec![
            Role {
                id: gid,
                name: "@everyone".into(),
                permissions: perms::EVERYONE_DEFAULT,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
            },
            Role {
                id: admin,
                name: "Admin".into(),
                permissions: perms::ADMINISTRATOR,
                position: 4,
                color: 0xE74C3C,
                hoist: true,
                mentionable: false,
            },
            Role {
                id: moderator,
                name: "Moderator".into(),
                permissions: perms::KICK_MEMBERS
                    | perms::BAN_MEMBERS
                    | perms::MANAGE_MESSAGES
                    | perms::MODERATE_MEMBERS
                    | perms::MANAGE_THREADS,
                position: 3,
                color: 0x3498DB,
                hoist: true,
                mentionable: true,
            },
            Role {
                id: staff,
                name: "Staff".into(),
                permissions: perms::MANAGE_MESSAGES | perms::MANAGE_THREADS,
                position: 2,
                color: 0x2ECC71,
                hoist: true,
                mentionable: true,
            },
            Role {
                id: customer,
                name: "Customer".into(),
                permissions: 0,
                position: 1,
                color: 0x95A5A6,
                hoist: false,
                mentionable: false,
            },
            Role {
                id: observer,
                name: "Observer".into(),
                permissions: perms::VIEW_CHANNEL
                    | perms::READ_MESSAGE_HISTORY
                    | perms::CONNECT
                    | perms::MANAGE_THREADS,
                position: 5,
                color: 0,
                hoist: false,
                mentionable: false,
            },
        ]
    }
}

/// Who is in a guild, and as what.
struct People {
    members: Vec<Member>,
    customers: Vec<u64>,
    staff_ids: Vec<u64>,
    owner_id: u64,
}

fn generate_guild(
    gi: usize,
    users: &[User],
    opts: &GenOptions,
    ids: &mut Ids,
    rng: &mut ChaCha8Rng,
) -> Guild {
    let gid = ids.next();
    let name = match GUILDS.get(gi) {
        Some(n) => n.to_string(),
        None => format!("Support Guild {}", gi + 1),
    };
    let r = GuildRoles::new(ids);
    let roles = r.roles(gid);
    let people = generate_members(gi, gid, &name, users, &r, opts, rng);
    let channels = generate_channels(gi, gid, &r, &people, opts, ids);
    Guild {
        id: gid,
        name,
        owner_id: people.owner_id,
        roles,
        channels,
        members: people.members,
        bot_present: true,
        bot_roles: vec![r.observer],
    }
}

#[allow(clippy::too_many_arguments)]
fn generate_members(
    gi: usize,
    gid: u64,
    name: &str,
    users: &[User],
    r: &GuildRoles,
    opts: &GenOptions,
    rng: &mut ChaCha8Rng,
) -> People {
    let far_future = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).single();
    let GuildRoles {
        admin,
        moderator,
        staff,
        customer,
        ..
    } = *r;
    // Members: the first guild has everyone; later guilds a random ~60% (plus their staff).
    let mut pool: Vec<usize> = (0..users.len()).collect();
    pool.shuffle(rng);
    let owner_idx = pool[0];
    let staff_idx: Vec<usize> = pool[1..=opts.staff_per_guild.min(pool.len() - 2)].to_vec();
    let mut members = Vec::new();
    let mut customers = Vec::new();
    for (pos, &ui) in pool.iter().enumerate() {
        let u = &users[ui];
        let in_guild = gi == 0 || ui == owner_idx || staff_idx.contains(&ui) || rng.gen_bool(0.6);
        if !in_guild {
            continue;
        }
        let roles = if ui == owner_idx {
            vec![]
        } else if let Some(si) = staff_idx.iter().position(|s| *s == ui) {
            match si {
                0 => vec![staff, moderator],
                1 if opts.staff_per_guild > 2 => vec![admin],
                _ => vec![staff],
            }
        } else if pos % 7 == 6 {
            vec![] // not verified yet: only @everyone
        } else {
            customers.push(u.id);
            vec![customer]
        };
        let timed_out = !customers.is_empty() && customers.len() == 4 && roles == vec![customer];
        members.push(Member {
            user_id: u.id,
            roles,
            nick: if pos % 5 == 3 {
                Some(format!(
                    "{} ({})",
                    u.username,
                    name.split(' ').next().unwrap_or("guild")
                ))
            } else {
                None
            },
            joined_at: snowflake_time(gid),
            communication_disabled_until: if timed_out { far_future } else { None },
        });
    }
    members.sort_by_key(|m| m.user_id);
    let staff_ids: Vec<u64> = staff_idx.iter().map(|i| users[*i].id).collect();
    let owner_id = users[owner_idx].id;

    People {
        members,
        customers,
        staff_ids,
        owner_id,
    }
}

/// The guild's channels: a public support area with a ticket forum, a staff
/// area (partly mirrored by the bot, partly not), their threads.
fn generate_channels(
    gi: usize,
    gid: u64,
    r: &GuildRoles,
    people: &People,
    opts: &GenOptions,
    ids: &mut Ids,
) -> Vec<Channel> {
    let GuildRoles {
        moderator,
        staff,
        customer,
        observer,
        ..
    } = *r;
    let customers = &people.customers;
    let support_cat = ids.next();
    let staff_cat = ids.next();
    let staff_only = vec![
        ow(gid, OverwriteKind::Role, 0, perms::VIEW_CHANNEL),
        ow(staff, OverwriteKind::Role, perms::VIEW_CHANNEL, 0),
        ow(moderator, OverwriteKind::Role, perms::VIEW_CHANNEL, 0),
    ];
    // Staff areas the organisation lets the observer mirror; `leadership` stays
    // private to people, so every guild has a channel the bot cannot read.
    let mut staff_observed = staff_only.clone();
    staff_observed.push(ow(observer, OverwriteKind::Role, perms::VIEW_CHANNEL, 0));
    let mut channels = vec![
        Channel {
            kind: ChannelKind::Category,
            ..text(support_cat, "Support", None, 0, vec![])
        },
        text(
            ids.next(),
            "welcome",
            Some(support_cat),
            0,
            vec![ow(gid, OverwriteKind::Role, 0, perms::SEND_MESSAGES)],
        ),
        text(ids.next(), "general-help", Some(support_cat), 1, vec![]),
        text(
            ids.next(),
            "billing",
            Some(support_cat),
            2,
            // One customer was banned from billing by a member overwrite.
            customers
                .get(1)
                .map(|c| vec![ow(*c, OverwriteKind::Member, 0, perms::VIEW_CHANNEL)])
                .unwrap_or_default(),
        ),
        text(ids.next(), "bug-reports", Some(support_cat), 3, vec![]),
        Channel {
            kind: ChannelKind::Announcement,
            ..text(
                ids.next(),
                "announcements",
                Some(support_cat),
                4,
                vec![ow(gid, OverwriteKind::Role, 0, perms::SEND_MESSAGES)],
            )
        },
        text(
            ids.next(),
            "changelog",
            Some(support_cat),
            5,
            vec![ow(
                customer,
                OverwriteKind::Role,
                0,
                perms::READ_MESSAGE_HISTORY,
            )],
        ),
        Channel {
            kind: ChannelKind::Category,
            ..text(staff_cat, "Staff", None, 1, staff_only.clone())
        },
        text(
            ids.next(),
            "staff-chat",
            Some(staff_cat),
            0,
            staff_observed.clone(),
        ),
        text(
            ids.next(),
            "leadership",
            Some(staff_cat),
            2,
            staff_only.clone(),
        ),
        Channel {
            kind: ChannelKind::Voice,
            ..text(
                ids.next(),
                "Support call",
                Some(support_cat),
                7,
                vec![ow(gid, OverwriteKind::Role, perms::CONNECT, 0)],
            )
        },
    ];
    let escalations = ids.next();
    channels.push(text(
        escalations,
        "escalations",
        Some(staff_cat),
        1,
        staff_observed,
    ));
    let forum = ids.next();
    channels.push(Channel {
        kind: ChannelKind::Forum,
        topic: Some("One thread per ticket".into()),
        ..text(forum, "tickets", Some(support_cat), 6, vec![])
    });
    // Allocated after the threads so that adding tags moved no other id.
    let mut threads = generate_threads(gi, forum, escalations, people, opts, ids);
    let tags: Vec<ForumTag> = FORUM_TAGS
        .iter()
        .map(|(name, moderated)| ForumTag {
            id: ids.next(),
            name: (*name).into(),
            moderated: *moderated,
            emoji_name: None,
        })
        .collect();
    for (t, c) in threads.iter_mut().enumerate() {
        let in_forum = c.parent_id == Some(forum);
        if let (true, Some(info)) = (in_forum, c.thread.as_mut()) {
            // A question or a bug; the archived ticket was also marked solved.
            info.applied_tags.push(tags[t % 2].id);
            if info.archived {
                info.applied_tags.push(tags[2].id);
            }
        }
    }
    if let Some(f) = channels.iter_mut().find(|c| c.id == forum) {
        f.available_tags = tags;
    }
    channels.extend(threads);
    channels
}

/// The generated forum's tags: (name, moderated). "solved" is moderated, as support
/// servers usually make it, so only staff can mark a post solved.
const FORUM_TAGS: [(&str, bool); 4] = [
    ("question", false),
    ("bug", false),
    ("solved", true),
    ("feature request", false),
];

/// A forum ticket per `tickets_per_guild` (a customer and a helper in each,
/// the last one archived) and a private escalation thread in the staff area
/// that one customer was invited into.
fn generate_threads(
    gi: usize,
    forum: u64,
    escalations: u64,
    people: &People,
    opts: &GenOptions,
    ids: &mut Ids,
) -> Vec<Channel> {
    let People {
        customers,
        staff_ids,
        owner_id,
        ..
    } = people;
    let owner_id = *owner_id;
    let mut channels = Vec::new();
    for t in 0..opts.tickets_per_guild {
        let owner = customers
            .get(t % customers.len().max(1))
            .copied()
            .unwrap_or(owner_id);
        let helper = staff_ids
            .get(t % staff_ids.len().max(1))
            .copied()
            .unwrap_or(owner_id);
        channels.push(Channel {
            id: ids.next(),
            kind: ChannelKind::PublicThread,
            name: TICKETS[(gi * 3 + t) % TICKETS.len()].into(),
            parent_id: Some(forum),
            position: 0,
            topic: None,
            overwrites: vec![],
            thread: Some(ThreadInfo {
                owner_id: owner,
                archived: t + 1 == opts.tickets_per_guild && t > 1,
                locked: false,
                auto_archive_duration: 1440,
                invitable: true,
                members: vec![owner, helper],
                archive_timestamp: None,
                applied_tags: vec![],
            }),
            available_tags: vec![],
        });
    }
    // A private escalation thread in the staff area that one customer was invited into.
    let escalated = customers.first().copied();
    channels.push(Channel {
        id: ids.next(),
        kind: ChannelKind::PrivateThread,
        name: "Escalation: enterprise outage".into(),
        parent_id: Some(escalations),
        position: 0,
        topic: None,
        overwrites: vec![],
        thread: Some(ThreadInfo {
            owner_id: staff_ids.first().copied().unwrap_or(owner_id),
            archived: false,
            locked: false,
            auto_archive_duration: 4320,
            invitable: false,
            members: staff_ids.iter().copied().take(2).chain(escalated).collect(),
            archive_timestamp: None,
            applied_tags: vec![],
        }),
        available_tags: vec![],
    });
    channels
}
