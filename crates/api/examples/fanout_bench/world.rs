use super::*;

/// The bench part of the world: which channels exist and who holds which role.
pub(super) struct World {
    /// (guild id, channel id, author id) of every bench channel.
    pub(super) channels: Vec<(u64, u64, u64)>,
    /// channel id → the team role that opens it (None: public).
    pub(super) channel_role: HashMap<u64, Option<u64>>,
    pub(super) viewers: Vec<u64>,
    /// viewer → team roles held (across guilds).
    pub(super) held: HashMap<u64, BTreeSet<u64>>,
    pub(super) guild_ids: Vec<u64>,
}

pub(super) fn build_world(sc: &mut Scenario, a: &Args) -> anyhow::Result<World> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    // 2025-01-01: after the generated ids (2024), before anything live.
    let mut next = observer_sim::model::snowflake_at(1_735_689_600_000);
    let mut id = || {
        next += 1;
        next
    };
    let viewers: Vec<u64> = (0..a.viewers).map(|_| id()).collect();
    for (i, v) in viewers.iter().enumerate() {
        sc.users.push(User {
            id: *v,
            username: format!("viewer{i}"),
            global_name: None,
            avatar: None,
            bot: false,
        });
    }
    let mut w = World {
        channels: Vec::new(),
        channel_role: HashMap::new(),
        viewers: viewers.clone(),
        held: HashMap::new(),
        guild_ids: Vec::new(),
    };
    // guild id → its team roles
    let mut team: Vec<(u64, Vec<u64>)> = Vec::new();
    for g in &mut sc.guilds {
        w.guild_ids.push(g.id);
        let roles = add_bench_channels(g, a, &mut id, &mut w)?;
        team.push((g.id, roles));
    }
    let mut per_guild = draw_role_sets(&viewers, &team, &mut rng, a, &mut w)?;
    let joined = chrono::Utc::now() - chrono::Duration::days(30);
    for g in &mut sc.guilds {
        for (user_id, roles) in per_guild.remove(&g.id).unwrap_or_default() {
            g.members.push(Member {
                user_id,
                roles,
                nick: None,
                joined_at: joined,
                communication_disabled_until: None,
            });
        }
    }
    Ok(w)
}

/// One guild's `--roles` team roles, each with its private channel, and its
/// `--public-channels` open channels; returns the team roles.
fn add_bench_channels(
    g: &mut observer_sim::model::Guild,
    a: &Args,
    id: &mut impl FnMut() -> u64,
    w: &mut World,
) -> anyhow::Result<Vec<u64>> {
    let author = g
        .members
        .first()
        .map(|m| m.user_id)
        .context("generated guild without members")?;
    let mut roles = Vec::new();
    for r in 0..a.roles {
        let rid = id();
        g.roles.push(Role {
            id: rid,
            name: format!("team-{r}"),
            permissions: 0,
            position: 1,
            color: 0,
            hoist: false,
            mentionable: false,
        });
        let cid = id();
        let channel = private_channel(g.id, rid, cid, r, &g.bot_roles);
        g.channels.push(channel);
        w.channels.push((g.id, cid, author));
        w.channel_role.insert(cid, Some(rid));
        roles.push(rid);
    }
    for p in 0..a.public_channels {
        let cid = id();
        g.channels.push(Channel {
            id: cid,
            kind: ChannelKind::Text,
            name: format!("bench-public-{p}"),
            parent_id: None,
            position: 200 + p as i32,
            topic: None,
            overwrites: Vec::new(),
            thread: None,
            available_tags: vec![],
        });
        w.channels.push((g.id, cid, author));
        w.channel_role.insert(cid, None);
    }
    Ok(roles)
}

/// Team `r`'s channel: hidden from @everyone, open to the team role.
fn private_channel(guild_id: u64, rid: u64, cid: u64, r: usize, bot_roles: &[u64]) -> Channel {
    Channel {
        id: cid,
        kind: ChannelKind::Text,
        name: format!("team-{r}-private"),
        parent_id: None,
        position: 100 + r as i32,
        topic: None,
        overwrites: vec![
            Overwrite {
                id: guild_id,
                kind: OverwriteKind::Role,
                allow: 0,
                deny: perms::VIEW_CHANNEL,
            },
            Overwrite {
                id: rid,
                kind: OverwriteKind::Role,
                allow: perms::VIEW_CHANNEL,
                deny: 0,
            },
        ]
        .into_iter()
        // The bot is a member like any other: Discord sends it nothing from a
        // channel its own roles cannot read, so the bench channels let them in.
        .chain(bot_roles.iter().map(|b| Overwrite {
            id: *b,
            kind: OverwriteKind::Role,
            allow: perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY,
            deny: 0,
        }))
        .collect(),
        thread: None,
        available_tags: vec![],
    }
}

/// guild id → (viewer, the team roles they hold there).
type RolesByGuild = HashMap<u64, Vec<(u64, Vec<u64>)>>;

/// Distinct role sets: redraw duplicates (a few tries each). Records each
/// viewer's set in `w.held`.
fn draw_role_sets(
    viewers: &[u64],
    team: &[(u64, Vec<u64>)],
    rng: &mut rand::rngs::StdRng,
    a: &Args,
    w: &mut World,
) -> anyhow::Result<RolesByGuild> {
    let mut seen: HashSet<BTreeSet<u64>> = HashSet::new();
    let mut per_guild = RolesByGuild::new();
    for v in viewers {
        let mut tries = 0;
        let set = loop {
            let set: BTreeSet<u64> = team
                .iter()
                .flat_map(|(_, rs)| rs.iter().copied())
                .filter(|_| rng.gen_bool(a.role_prob))
                .collect();
            if seen.insert(set.clone()) {
                break set;
            }
            tries += 1;
            if tries > 10_000 {
                bail!(
                    "cannot draw {} distinct role sets: raise --roles or --role-prob",
                    a.viewers
                );
            }
        };
        for (gid, rs) in team {
            let mine: Vec<u64> = rs.iter().copied().filter(|r| set.contains(r)).collect();
            per_guild.entry(*gid).or_default().push((*v, mine));
        }
        w.held.insert(*v, set);
    }
    Ok(per_guild)
}
