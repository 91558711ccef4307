//! Property test: on thousands of random guilds, the SQL access rule (read as the
//! api role, per viewer), the Rust rule (`observer_db::access`) and an independent
//! reference built on twilight's `PermissionCalculator` agree exactly.
//!
//! Seed and size: `ACCESS_SEED` (default: random, printed) and `ACCESS_GUILDS`
//! (default 3,000). A failure prints the seed; rerun with `ACCESS_SEED=<seed>`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SubsecRound, Utc};
use observer_db::access::{
    self, kinds, perms, ChannelAccess, ChannelData, GuildAccessData, MemberData, Overwrite,
    OverwriteKind,
};
use observer_db::Db;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::PgPool;
use twilight_model::channel::permission_overwrite::{PermissionOverwrite, PermissionOverwriteType};
use twilight_model::channel::ChannelType;
use twilight_model::guild::Permissions;
use twilight_model::id::Id;
use twilight_util::permission_calculator::PermissionCalculator;

/// One random guild: the Rust rule's input plus the members (all of them, so the
/// reference and the database see the same world).
struct World {
    guild: GuildAccessData,
    /// user id → member; users in `users` but not here have left (or never joined).
    members: BTreeMap<i64, MemberData>,
    /// Users who touch this guild somehow (members, leavers with overwrites or
    /// thread memberships, the owner): the viewers checked for it.
    users: BTreeSet<i64>,
}

struct Ids(i64);
impl Ids {
    fn next(&mut self) -> i64 {
        self.0 += 1;
        self.0
    }
}

/// Probabilities of the bits the rule reads, for [`random_perms`].
struct Bias {
    view: f64,
    history: f64,
    admin: f64,
    manage_threads: f64,
    connect: f64,
}

/// Random permission bits, biased towards the ones the rule reads.
fn random_perms(rng: &mut ChaCha8Rng, b: &Bias) -> u64 {
    let mut p = 0u64;
    // Noise in every defined bit twilight knows (0..=46), to catch masking slips.
    for _ in 0..rng.gen_range(0..4) {
        p |= 1u64 << rng.gen_range(0..47);
    }
    p &= !(perms::ADMINISTRATOR
        | perms::VIEW_CHANNEL
        | perms::READ_MESSAGE_HISTORY
        | perms::MANAGE_THREADS
        | perms::CONNECT);
    if rng.gen_bool(b.view) {
        p |= perms::VIEW_CHANNEL;
    }
    if rng.gen_bool(b.history) {
        p |= perms::READ_MESSAGE_HISTORY;
    }
    if rng.gen_bool(b.admin) {
        p |= perms::ADMINISTRATOR;
    }
    if rng.gen_bool(b.manage_threads) {
        p |= perms::MANAGE_THREADS;
    }
    if rng.gen_bool(b.connect) {
        p |= perms::CONNECT;
    }
    if rng.gen_bool(0.15) {
        p |= perms::MANAGE_GUILD;
    }
    p
}

fn random_world(
    rng: &mut ChaCha8Rng,
    ids: &mut Ids,
    user_pool: &[i64],
    now: DateTime<Utc>,
) -> World {
    let guild_id = ids.next();
    let n_users = rng.gen_range(3..=7);
    let users: Vec<i64> = user_pool.choose_multiple(rng, n_users).copied().collect();

    let mut roles = BTreeMap::new();
    let everyone = Bias {
        view: 0.6,
        history: 0.6,
        admin: 0.02,
        manage_threads: 0.05,
        connect: 0.6,
    };
    roles.insert(guild_id, random_perms(rng, &everyone));
    let role_bias = Bias {
        view: 0.35,
        history: 0.35,
        admin: 0.08,
        manage_threads: 0.2,
        connect: 0.35,
    };
    let mut role_ids = vec![];
    for _ in 0..rng.gen_range(0..=5) {
        let r = ids.next();
        roles.insert(r, random_perms(rng, &role_bias));
        role_ids.push(r);
    }
    // A role that members and overwrites reference but that no longer exists.
    let ghost_role = ids.next();

    let pick_role = |rng: &mut ChaCha8Rng| -> i64 {
        if role_ids.is_empty() || rng.gen_bool(0.1) {
            ghost_role
        } else {
            role_ids[rng.gen_range(0..role_ids.len())]
        }
    };

    let mut members = BTreeMap::new();
    for &u in &users {
        if rng.gen_bool(0.15) {
            continue; // left the guild
        }
        let mut mine: Vec<i64> = role_ids
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(0.35))
            .collect();
        if rng.gen_bool(0.05) {
            mine.push(ghost_role);
        }
        if rng.gen_bool(0.03) {
            mine.push(guild_id); // Discord never sends @everyone here; the rule must ignore it
        }
        let timeout = match rng.gen_range(0..10) {
            0 | 1 => Some(now + Duration::minutes(rng.gen_range(60..100_000))),
            2 => Some(now - Duration::minutes(rng.gen_range(60..100_000))),
            _ => None,
        };
        members.insert(
            u,
            MemberData {
                user_id: u,
                role_ids: mine,
                communication_disabled_until: timeout,
                thread_ids: BTreeSet::new(),
            },
        );
    }

    let owner_id = if rng.gen_bool(0.75) {
        users[rng.gen_range(0..users.len())]
    } else {
        ids.next() // an owner who is not among the checked users
    };

    let observer_role_ids = if rng.gen_bool(0.3) {
        let mut o = vec![pick_role(rng)];
        if rng.gen_bool(0.3) {
            o.push(pick_role(rng));
        }
        if rng.gen_bool(0.1) {
            o.push(guild_id);
        }
        o
    } else {
        vec![]
    };

    let random_overwrites = |rng: &mut ChaCha8Rng| -> Vec<Overwrite> {
        let mut out: Vec<Overwrite> = vec![];
        let mut seen = BTreeSet::new();
        for _ in 0..rng.gen_range(0..=4) {
            let (target_id, kind) = match rng.gen_range(0..3) {
                0 => (guild_id, OverwriteKind::Role),
                1 => (pick_role(rng), OverwriteKind::Role),
                _ => (users[rng.gen_range(0..users.len())], OverwriteKind::Member),
            };
            if !seen.insert((target_id, kind == OverwriteKind::Member)) {
                continue; // (channel, target, kind) is the primary key
            }
            out.push(Overwrite {
                target_id,
                kind,
                allow: random_perms(
                    rng,
                    &Bias {
                        view: 0.3,
                        history: 0.25,
                        admin: 0.0,
                        manage_threads: 0.15,
                        connect: 0.25,
                    },
                ),
                deny: random_perms(
                    rng,
                    &Bias {
                        view: 0.3,
                        history: 0.25,
                        admin: 0.0,
                        manage_threads: 0.1,
                        connect: 0.3,
                    },
                ),
            });
        }
        out
    };

    let mut channels = BTreeMap::new();
    let mut categories = vec![];
    for _ in 0..rng.gen_range(0..=2) {
        let id = ids.next();
        categories.push(id);
        channels.insert(
            id,
            ChannelData {
                channel_id: id,
                kind: kinds::CATEGORY,
                parent_id: None,
                overwrites: random_overwrites(rng),
            },
        );
    }
    let mut parents = vec![];
    for _ in 0..rng.gen_range(1..=5) {
        let id = ids.next();
        let kind = *[
            kinds::TEXT,
            kinds::TEXT,
            kinds::ANNOUNCEMENT,
            kinds::FORUM,
            kinds::MEDIA,
            kinds::VOICE,
            kinds::VOICE,
            kinds::STAGE,
            kinds::STAGE,
        ]
        .choose(rng)
        .unwrap_or(&kinds::TEXT);
        let parent_id = if !categories.is_empty() && rng.gen_bool(0.6) {
            Some(categories[rng.gen_range(0..categories.len())])
        } else {
            None
        };
        if matches!(
            kind,
            kinds::TEXT | kinds::ANNOUNCEMENT | kinds::FORUM | kinds::MEDIA
        ) {
            parents.push(id);
        }
        channels.insert(
            id,
            ChannelData {
                channel_id: id,
                kind,
                parent_id,
                overwrites: random_overwrites(rng),
            },
        );
    }
    for _ in 0..rng.gen_range(0..=4) {
        let id = ids.next();
        let kind = *[
            kinds::PUBLIC_THREAD,
            kinds::PRIVATE_THREAD,
            kinds::PRIVATE_THREAD,
            kinds::ANNOUNCEMENT_THREAD,
        ]
        .choose(rng)
        .unwrap_or(&kinds::PUBLIC_THREAD);
        let parent_id = if parents.is_empty() || rng.gen_bool(0.04) {
            Some(ids.next()) // parent not (yet) known
        } else {
            Some(parents[rng.gen_range(0..parents.len())])
        };
        // Threads' own overwrites must be ignored: give some anyway.
        let overwrites = if rng.gen_bool(0.2) {
            random_overwrites(rng)
        } else {
            vec![]
        };
        channels.insert(
            id,
            ChannelData {
                channel_id: id,
                kind,
                parent_id,
                overwrites,
            },
        );
        for &u in &users {
            if rng.gen_bool(0.3) {
                if let Some(m) = members.get_mut(&u) {
                    m.thread_ids.insert(id);
                } else {
                    // A leaver still listed as a thread member: stored for the database only.
                    continue;
                }
            }
        }
    }

    let guild = GuildAccessData {
        guild_id,
        owner_id,
        observer_role_ids,
        removed: rng.gen_bool(0.05),
        roles,
        channels,
    };
    World {
        guild,
        members,
        users: users.into_iter().collect(),
    }
}

/// The independent reference: twilight's calculator for Discord's channel
/// computation, plus the rules it does not cover (discord-protocol.md §4–5, §9):
/// membership, removed guild, observer gate, threads via parent, private threads,
/// timeouts, and the implicit deny of voice and stage chat without CONNECT.
fn reference(
    w: &World,
    user: i64,
    now: DateTime<Utc>,
    cov: &mut Coverage,
) -> BTreeMap<i64, ChannelAccess> {
    let g = &w.guild;
    let mut out = BTreeMap::new();
    if g.removed {
        cov.removed_guild += 1;
        return out;
    }
    let Some(m) = w.members.get(&user) else {
        cov.not_member += 1;
        return out;
    };
    let everyone = Permissions::from_bits_truncate(g.roles.get(&g.guild_id).copied().unwrap_or(0));
    // Every listed role takes part in overwrites, known or not; @everyone is not a member role.
    let member_roles: Vec<(Id<twilight_model::id::marker::RoleMarker>, Permissions)> = m
        .role_ids
        .iter()
        .filter(|r| **r != g.guild_id)
        .map(|r| {
            (
                Id::new(u64::try_from(*r).expect("positive id")),
                Permissions::from_bits_truncate(g.roles.get(r).copied().unwrap_or(0)),
            )
        })
        .collect();
    let gid = Id::new(u64::try_from(g.guild_id).expect("positive id"));
    let uid = Id::new(u64::try_from(user).expect("positive id"));
    let owner = Id::new(u64::try_from(g.owner_id).expect("positive id"));
    let calc = || PermissionCalculator::new(gid, uid, everyone, &member_roles).owner_id(owner);
    let admin = calc().root().contains(Permissions::ADMINISTRATOR);
    let gate = admin
        || g.observer_role_ids.is_empty()
        || g.observer_role_ids
            .iter()
            .any(|o| *o == g.guild_id || m.role_ids.contains(o));
    if !gate {
        cov.gate_blocked += 1;
        return out;
    }
    if !g.observer_role_ids.is_empty() {
        cov.gate_passed += 1;
    }
    if admin {
        cov.owner_or_admin += 1;
    }
    let timed_out = !admin && m.communication_disabled_until.is_some_and(|t| t > now);
    if timed_out {
        cov.timed_out += 1;
    }
    for c in g.channels.values() {
        let is_thread = matches!(c.kind, 10..=12);
        let target = if is_thread {
            match c.parent_id.and_then(|p| g.channels.get(&p)) {
                Some(p) => p,
                None => {
                    cov.thread_without_parent += 1;
                    continue;
                }
            }
        } else {
            c
        };
        let overwrites: Vec<PermissionOverwrite> = target
            .overwrites
            .iter()
            .map(|o| PermissionOverwrite {
                allow: Permissions::from_bits_truncate(o.allow),
                deny: Permissions::from_bits_truncate(o.deny),
                id: Id::new(u64::try_from(o.target_id).expect("positive id")),
                kind: match o.kind {
                    OverwriteKind::Role => PermissionOverwriteType::Role,
                    OverwriteKind::Member => PermissionOverwriteType::Member,
                },
            })
            .collect();
        // twilight strips READ_MESSAGE_HISTORY from voice and stage channels by
        // type; Discord has text chat in both (and so a history permission), so
        // they are computed as text channels here. VIEW_CHANNEL is unaffected.
        let kind = match target.kind {
            5 => ChannelType::GuildAnnouncement,
            15 => ChannelType::GuildForum,
            16 => ChannelType::GuildMedia,
            4 => ChannelType::GuildCategory,
            _ => ChannelType::GuildText,
        };
        let mut p = calc().in_channel(kind, &overwrites);
        // CONNECT is read in the channel's own type (twilight keeps it for voice
        // and stage, strips it from text).
        let voice = matches!(target.kind, 2 | 13);
        let mut connect = voice
            && calc()
                .in_channel(
                    if target.kind == 2 {
                        ChannelType::GuildVoice
                    } else {
                        ChannelType::GuildStageVoice
                    },
                    &overwrites,
                )
                .contains(Permissions::CONNECT);
        if timed_out {
            p &= Permissions::VIEW_CHANNEL | Permissions::READ_MESSAGE_HISTORY;
            connect = false;
        }
        if target
            .overwrites
            .iter()
            .any(|o| o.kind == OverwriteKind::Member && o.target_id == user)
        {
            cov.member_overwrite += 1;
        }
        if c.kind == 12 && p.contains(Permissions::VIEW_CHANNEL) {
            if p.contains(Permissions::MANAGE_THREADS) {
                cov.private_by_manage_threads += 1;
            } else if m.thread_ids.contains(&c.channel_id) {
                cov.private_by_membership += 1;
            } else {
                cov.private_denied += 1;
            }
        }
        if c.kind == 12
            && !p.contains(Permissions::MANAGE_THREADS)
            && !m.thread_ids.contains(&c.channel_id)
        {
            continue;
        }
        let view = p.contains(Permissions::VIEW_CHANNEL);
        // Voice and stage chat: without CONNECT only the channel itself shows.
        let read = view && (!voice || connect);
        let history = read && p.contains(Permissions::READ_MESSAGE_HISTORY);
        if !view {
            cov.hidden += 1;
        } else if voice && !read {
            cov.voice_locked += 1;
            if timed_out {
                cov.voice_locked_by_timeout += 1;
            }
        } else if voice {
            cov.voice_readable += 1;
        } else if !history {
            cov.live_only += 1;
        }
        if view {
            out.insert(
                c.channel_id,
                ChannelAccess {
                    view,
                    read,
                    history,
                },
            );
        }
    }
    out
}

/// How often each branch of the rule was taken: a generator that never reaches a
/// branch would let a bug there pass.
#[derive(Debug, Default)]
struct Coverage {
    removed_guild: usize,
    not_member: usize,
    gate_blocked: usize,
    gate_passed: usize,
    owner_or_admin: usize,
    timed_out: usize,
    thread_without_parent: usize,
    member_overwrite: usize,
    private_by_manage_threads: usize,
    private_by_membership: usize,
    private_denied: usize,
    live_only: usize,
    hidden: usize,
    voice_locked: usize,
    voice_locked_by_timeout: usize,
    voice_readable: usize,
}

impl Coverage {
    fn all_reached(&self) -> bool {
        [
            self.removed_guild,
            self.not_member,
            self.gate_blocked,
            self.gate_passed,
            self.owner_or_admin,
            self.timed_out,
            self.thread_without_parent,
            self.member_overwrite,
            self.private_by_manage_threads,
            self.private_by_membership,
            self.private_denied,
            self.live_only,
            self.hidden,
            self.voice_locked,
            self.voice_locked_by_timeout,
            self.voice_readable,
        ]
        .iter()
        .all(|n| *n > 0)
    }
}

/// Writes every world in a handful of bulk statements (as the test's superuser:
/// seeding only; every read under test goes through the api role).
async fn seed_worlds(
    pool: &PgPool,
    worlds: &[World],
    leaver_threads: &[(i64, i64, i64)],
) -> anyhow::Result<()> {
    let mut g_id = vec![];
    let mut g_owner = vec![];
    let mut g_obs = vec![];
    let mut g_removed = vec![];
    let (mut r_g, mut r_id, mut r_p) = (vec![], vec![], vec![]);
    let (mut c_g, mut c_id, mut c_kind, mut c_parent) = (vec![], vec![], vec![], vec![]);
    let (mut o_g, mut o_c, mut o_t, mut o_k, mut o_a, mut o_d) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut m_g, mut m_u, mut m_roles, mut m_to) = (vec![], vec![], vec![], vec![]);
    let (mut t_g, mut t_t, mut t_u) = (vec![], vec![], vec![]);
    for w in worlds {
        let g = &w.guild;
        g_id.push(g.guild_id);
        g_owner.push(g.owner_id);
        g_obs.push(array_literal(&g.observer_role_ids));
        g_removed.push(g.removed);
        for (r, p) in &g.roles {
            r_g.push(g.guild_id);
            r_id.push(*r);
            r_p.push(*p as i64);
        }
        for c in g.channels.values() {
            c_g.push(g.guild_id);
            c_id.push(c.channel_id);
            c_kind.push(c.kind);
            c_parent.push(c.parent_id);
            for o in &c.overwrites {
                o_g.push(g.guild_id);
                o_c.push(c.channel_id);
                o_t.push(o.target_id);
                o_k.push(if o.kind == OverwriteKind::Role {
                    0i16
                } else {
                    1
                });
                o_a.push(o.allow as i64);
                o_d.push(o.deny as i64);
            }
        }
        for m in w.members.values() {
            m_g.push(g.guild_id);
            m_u.push(m.user_id);
            m_roles.push(array_literal(&m.role_ids));
            m_to.push(m.communication_disabled_until);
            for t in &m.thread_ids {
                t_g.push(g.guild_id);
                t_t.push(*t);
                t_u.push(m.user_id);
            }
        }
    }
    for (g, t, u) in leaver_threads {
        t_g.push(*g);
        t_t.push(*t);
        t_u.push(*u);
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into guilds (guild_id, owner_id, observer_role_ids, removed_at)
         select g, o, obs::bigint[], case when rm then now() end
         from unnest($1::bigint[], $2::bigint[], $3::text[], $4::bool[]) as t(g, o, obs, rm)",
    )
    .bind(&g_id)
    .bind(&g_owner)
    .bind(&g_obs)
    .bind(&g_removed)
    .execute(&mut *tx)
    .await?;
    sqlx::query("insert into roles (guild_id, role_id, permissions) select * from unnest($1::bigint[], $2::bigint[], $3::bigint[])")
        .bind(&r_g)
        .bind(&r_id)
        .bind(&r_p)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, parent_id)
         select * from unnest($1::bigint[], $2::bigint[], $3::smallint[], $4::bigint[])",
    )
    .bind(&c_g)
    .bind(&c_id)
    .bind(&c_kind)
    .bind(&c_parent)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny)
         select * from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::smallint[], $5::bigint[], $6::bigint[])",
    )
    .bind(&o_g)
    .bind(&o_c)
    .bind(&o_t)
    .bind(&o_k)
    .bind(&o_a)
    .bind(&o_d)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into members (guild_id, user_id, role_ids, communication_disabled_until)
         select g, u, r::bigint[], t from unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[]) as x(g, u, r, t)",
    )
    .bind(&m_g)
    .bind(&m_u)
    .bind(&m_roles)
    .bind(&m_to)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into thread_members (guild_id, thread_id, user_id)
         select * from unnest($1::bigint[], $2::bigint[], $3::bigint[]) on conflict do nothing",
    )
    .bind(&t_g)
    .bind(&t_t)
    .bind(&t_u)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn array_literal(ids: &[i64]) -> String {
    let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("{{{}}}", parts.join(","))
}

/// (guild, channel) → (read live, read history), for every visible channel.
type Visible = BTreeMap<(i64, i64), (bool, bool)>;

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn sql_rust_and_reference_agree_on_random_guilds(pool: PgPool) -> anyhow::Result<()> {
    observer_db::migrate::apply_policies(&pool).await?;
    let seed: u64 = match std::env::var("ACCESS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    let n_guilds: usize = match std::env::var("ACCESS_GUILDS") {
        Ok(s) => s.parse()?,
        Err(_) => 3_000,
    };
    println!("access property test: ACCESS_SEED={seed} ACCESS_GUILDS={n_guilds}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // PostgreSQL keeps microseconds: round so stored timeouts read back equal.
    let now = Utc::now().trunc_subsecs(6);
    let mut ids = Ids(1_000_000);
    let user_pool: Vec<i64> = (0..400).map(|_| ids.next()).collect();
    let worlds: Vec<World> = (0..n_guilds)
        .map(|_| random_world(&mut rng, &mut ids, &user_pool, now))
        .collect();

    // Leavers who are still listed in thread_members: visible to nobody.
    let mut leaver_threads = vec![];
    for w in &worlds {
        for c in w
            .guild
            .channels
            .values()
            .filter(|c| c.kind == kinds::PRIVATE_THREAD)
        {
            for u in w.users.iter().filter(|u| !w.members.contains_key(u)) {
                leaver_threads.push((w.guild.guild_id, c.channel_id, *u));
            }
        }
    }
    seed_worlds(&pool, &worlds, &leaver_threads).await?;
    // One message, one event and (for each thread) one conversation per
    // channel, so the sampled viewers below read the history policies
    // themselves (messages and conversations test threads through their
    // parent, never through a list of threads).
    sqlx::raw_sql(
        "insert into messages (guild_id, message_id, channel_id, created_at, seen_create)
           select guild_id, channel_id, channel_id, now(), true from channels;
         insert into message_events (guild_id, kind, channel_id, message_id)
           select guild_id, 1, channel_id, channel_id from channels;
         insert into conversations (guild_id, conversation_id, channel_id, parent_id, opened_at,
                                    state, private)
           select guild_id, channel_id, channel_id, parent_id, now(), 'NEW', kind = 12
           from channels where kind in (10, 11, 12) and parent_id is not null;
         analyze;",
    )
    .execute(&pool)
    .await?;

    // Expected per viewer, from Rust and from the reference, checked against each other.
    let mut expected: BTreeMap<i64, Visible> =
        user_pool.iter().map(|u| (*u, Visible::new())).collect();
    let mut checked_pairs = 0usize;
    let mut cov = Coverage::default();
    let mut visible_pairs = 0usize;
    let mut manageable: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for w in &worlds {
        for &u in &w.users {
            let rust = access::visible_channels(&w.guild, w.members.get(&u), now);
            let reference = reference(w, u, now, &mut cov);
            assert_eq!(
                rust, reference,
                "Rust rule != reference for guild {} viewer {u} (ACCESS_SEED={seed})",
                w.guild.guild_id
            );
            // Per-channel entry point agrees with the set.
            for c in w.guild.channels.keys() {
                let one = access::channel_access(&w.guild, w.members.get(&u), *c, now);
                assert_eq!(
                    one,
                    rust.get(c).copied().unwrap_or(ChannelAccess::NONE),
                    "ACCESS_SEED={seed}"
                );
            }
            checked_pairs += 1;
            visible_pairs += rust.len();
            if access::can_manage_guild(&w.guild, w.members.get(&u), now) {
                manageable.entry(u).or_default().insert(w.guild.guild_id);
            }
            let e = expected.entry(u).or_default();
            for (c, a) in rust {
                e.insert((w.guild.guild_id, c), (a.read, a.history));
            }
        }
    }
    assert!(
        visible_pairs > n_guilds,
        "generator too strict: {visible_pairs} visible channels"
    );
    println!("{cov:?}");
    if n_guilds >= 1_000 {
        assert!(
            cov.all_reached(),
            "a branch of the rule was never exercised: {cov:?}"
        );
    }

    // The fan-out loader reads back inputs on which the Rust rule decides the same.
    let db = Db::new(pool.clone());
    let guild_ids: Vec<i64> = worlds.iter().map(|w| w.guild.guild_id).collect();
    let mut f = db.fanout().await?;
    let loaded = observer_db::access_data::load_guilds(&mut f, &guild_ids).await?;
    let loaded_members =
        observer_db::access_data::load_members(&mut f, &guild_ids, &user_pool).await?;
    f.commit().await?;
    assert_eq!(loaded.len(), worlds.len());
    for w in &worlds {
        let g = &loaded[&w.guild.guild_id];
        assert_eq!(g.roles, w.guild.roles);
        assert_eq!(g.observer_role_ids, w.guild.observer_role_ids);
        for &u in &w.users {
            let from_db = loaded_members.get(&(w.guild.guild_id, u));
            assert_eq!(
                from_db,
                w.members.get(&u),
                "member {u} of {}",
                w.guild.guild_id
            );
            assert_eq!(
                access::visible_channels(g, from_db, now),
                access::visible_channels(&w.guild, w.members.get(&u), now),
                "loaded guild {} viewer {u} (ACCESS_SEED={seed})",
                w.guild.guild_id
            );
        }
    }

    // SQL, as the api role, once per viewer over all guilds at once.
    for (i, (&u, want)) in expected.iter().enumerate() {
        let mut tx = db.viewer(u).await?;
        let rows: Vec<(i64, i64, bool, bool, bool)> = sqlx::query_as(
            "select guild_id, channel_id, can_view, can_read, can_read_history
             from access.viewer_channels()",
        )
        .fetch_all(&mut *tx)
        .await?;
        let got: Visible = rows
            .iter()
            .map(|(g, c, _, r, h)| ((*g, *c), (*r, *h)))
            .collect();
        assert!(
            rows.iter().all(|r| r.2),
            "can_view is always true in the result"
        );
        assert_eq!(rows.len(), got.len(), "no duplicate rows");
        if &got != want {
            let missing: Vec<_> = want.iter().filter(|(k, v)| got.get(k) != Some(v)).collect();
            let extra: Vec<_> = got.iter().filter(|(k, v)| want.get(k) != Some(v)).collect();
            panic!("SQL != Rust for viewer {u}: expected-not-got {missing:?}, got-not-expected {extra:?} (ACCESS_SEED={seed})");
        }
        // The policies themselves, for a sample of viewers (a full table scan each).
        if i % 8 == 0 {
            let chans: Vec<(i64, i64)> =
                sqlx::query_as("select guild_id, channel_id from channels")
                    .fetch_all(&mut *tx)
                    .await?;
            let chans: BTreeSet<(i64, i64)> = chans.into_iter().collect();
            let want_chans: BTreeSet<(i64, i64)> = want.keys().copied().collect();
            assert_eq!(
                chans, want_chans,
                "channels policy for viewer {u} (ACCESS_SEED={seed})"
            );
            let guilds: BTreeSet<i64> = sqlx::query_scalar::<_, i64>("select guild_id from guilds")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let want_guilds: BTreeSet<i64> = want.keys().map(|(g, _)| *g).collect();
            assert_eq!(
                guilds, want_guilds,
                "guilds policy for viewer {u} (ACCESS_SEED={seed})"
            );
            let want_hist: BTreeSet<i64> = want
                .iter()
                .filter(|(_, (_, h))| *h)
                .map(|((_, c), _)| *c)
                .collect();
            for table in ["messages", "message_events"] {
                let hist: BTreeSet<i64> =
                    sqlx::query_scalar::<_, i64>(&format!("select channel_id from {table}"))
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .collect();
                assert_eq!(
                    hist, want_hist,
                    "{table} policy for viewer {u} (ACCESS_SEED={seed})"
                );
            }
            let threads: BTreeSet<i64> =
                sqlx::query_scalar::<_, i64>("select channel_id from conversations")
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            let want_threads: BTreeSet<i64> = want_hist
                .iter()
                .copied()
                .filter(|c| {
                    worlds.iter().any(|w| {
                        w.guild.channels.get(c).is_some_and(|ch| {
                            matches!(
                                ch.kind,
                                kinds::ANNOUNCEMENT_THREAD
                                    | kinds::PUBLIC_THREAD
                                    | kinds::PRIVATE_THREAD
                            )
                        })
                    })
                })
                .collect();
            assert_eq!(
                threads, want_threads,
                "conversations policy for viewer {u} (ACCESS_SEED={seed})"
            );
            let managed: BTreeSet<i64> =
                sqlx::query_scalar::<_, Vec<i64>>("select access.manageable_guild_ids()")
                    .fetch_one(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            assert_eq!(
                managed,
                manageable.get(&u).cloned().unwrap_or_default(),
                "manageable guilds for viewer {u} (ACCESS_SEED={seed})"
            );
        }
        tx.commit().await?;
    }
    println!("checked {checked_pairs} (guild, viewer) pairs, {visible_pairs} visible channels, {} viewers", expected.len());
    Ok(())
}
