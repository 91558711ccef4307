//! Role, member and bot-membership mutations.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::model::{Member, Role, User};
use crate::payload;
use crate::SimError;

use super::World;

impl World {
    pub fn create_role(&mut self, guild_id: u64, mut r: Role) -> Result<Role, SimError> {
        self.guild(guild_id)?;
        if r.id == 0 {
            r.id = self.next_id();
        }
        self.guild_mut(guild_id)?.roles.insert(r.id, r.clone());
        self.dispatch(
            guild_id,
            "GUILD_ROLE_CREATE",
            &json!({"guild_id": guild_id.to_string(), "role": payload::role(&r)}),
        );
        Ok(r)
    }

    pub fn update_role(&mut self, guild_id: u64, r: Role) -> Result<Role, SimError> {
        self.syncing_access(guild_id, |w| w.update_role_inner(guild_id, r))
    }

    pub(super) fn update_role_inner(&mut self, guild_id: u64, r: Role) -> Result<Role, SimError> {
        let g = self.guild_mut(guild_id)?;
        if !g.roles.contains_key(&r.id) {
            return Err(SimError::UnknownRole(r.id));
        }
        g.roles.insert(r.id, r.clone());
        self.dispatch(
            guild_id,
            "GUILD_ROLE_UPDATE",
            &json!({"guild_id": guild_id.to_string(), "role": payload::role(&r)}),
        );
        Ok(r)
    }

    pub fn set_role_permissions(
        &mut self,
        guild_id: u64,
        role_id: u64,
        permissions: u64,
    ) -> Result<Role, SimError> {
        let mut r = self
            .guild(guild_id)?
            .roles
            .get(&role_id)
            .cloned()
            .ok_or(SimError::UnknownRole(role_id))?;
        r.permissions = permissions;
        self.update_role(guild_id, r)
    }

    pub fn delete_role(&mut self, guild_id: u64, role_id: u64) -> Result<(), SimError> {
        self.syncing_access(guild_id, |w| w.delete_role_inner(guild_id, role_id))
    }

    pub(super) fn delete_role_inner(
        &mut self,
        guild_id: u64,
        role_id: u64,
    ) -> Result<(), SimError> {
        if role_id == guild_id {
            return Err(SimError::Invalid("@everyone cannot be deleted".into()));
        }
        let g = self.guild_mut(guild_id)?;
        g.roles
            .remove(&role_id)
            .ok_or(SimError::UnknownRole(role_id))?;
        // Discord strips the role from members without sending member updates.
        for m in g.members.values_mut() {
            m.roles.retain(|r| *r != role_id);
        }
        self.dispatch(
            guild_id,
            "GUILD_ROLE_DELETE",
            &json!({"guild_id": guild_id.to_string(), "role_id": role_id.to_string()}),
        );
        Ok(())
    }

    pub(super) fn member_updated(&mut self, guild_id: u64, m: Member) -> Result<Member, SimError> {
        if m.user_id == self.bot.id {
            return self.syncing_access(guild_id, |w| w.member_updated_inner(guild_id, m));
        }
        self.member_updated_inner(guild_id, m)
    }

    pub(super) fn member_updated_inner(
        &mut self,
        guild_id: u64,
        m: Member,
    ) -> Result<Member, SimError> {
        self.guild_mut(guild_id)?
            .members
            .insert(m.user_id, m.clone());
        let d = payload::member_update(&m, &self.user_json(m.user_id), guild_id);
        self.dispatch(guild_id, "GUILD_MEMBER_UPDATE", &d);
        Ok(m)
    }

    pub(super) fn member(&self, guild_id: u64, user_id: u64) -> Result<Member, SimError> {
        self.guild(guild_id)?
            .members
            .get(&user_id)
            .cloned()
            .ok_or(SimError::NotAMember { guild_id, user_id })
    }

    pub fn set_member_roles(
        &mut self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        let g = self.guild(guild_id)?;
        if let Some(bad) = roles
            .iter()
            .find(|r| !g.roles.contains_key(r) || **r == guild_id)
        {
            return Err(SimError::UnknownRole(*bad));
        }
        let mut m = self.member(guild_id, user_id)?;
        m.roles = roles;
        self.member_updated(guild_id, m)
    }

    pub fn timeout_member(
        &mut self,
        guild_id: u64,
        user_id: u64,
        until: Option<DateTime<Utc>>,
    ) -> Result<Member, SimError> {
        let mut m = self.member(guild_id, user_id)?;
        m.communication_disabled_until = until;
        self.member_updated(guild_id, m)
    }

    pub fn add_member(
        &mut self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        if !self.users.contains_key(&user_id) {
            return Err(SimError::UnknownUser(user_id));
        }
        let joined_at = self.now();
        let g = self.guild_mut(guild_id)?;
        let m = Member {
            user_id,
            roles,
            nick: None,
            joined_at,
            communication_disabled_until: None,
        };
        g.members.insert(user_id, m.clone());
        let g = self.guild(guild_id)?;
        let d = self.member_json(g, &m);
        self.dispatch(guild_id, "GUILD_MEMBER_ADD", &d);
        Ok(m)
    }

    pub fn remove_member(&mut self, guild_id: u64, user_id: u64) -> Result<(), SimError> {
        let g = self.guild_mut(guild_id)?;
        g.members
            .remove(&user_id)
            .ok_or(SimError::NotAMember { guild_id, user_id })?;
        // Leaving a guild leaves its threads too (Discord sends no THREAD_MEMBERS_UPDATE for it).
        for c in g.channels.values_mut() {
            if let Some(t) = c.thread.as_mut() {
                t.members.retain(|u| *u != user_id);
            }
        }
        let user = self.user_json(user_id);
        self.dispatch(
            guild_id,
            "GUILD_MEMBER_REMOVE",
            &json!({"guild_id": guild_id.to_string(), "user": user}),
        );
        Ok(())
    }

    pub fn add_user(&mut self, u: User) {
        self.users.insert(u.id, u);
    }

    pub fn remove_bot_from_guild(&mut self, guild_id: u64) -> Result<(), SimError> {
        let g = self.guild_mut(guild_id)?;
        if !g.bot_present {
            return Ok(());
        }
        g.bot_present = false;
        // Absent `unavailable` is what tells a client it was removed, not an outage.
        self.dispatch(
            guild_id,
            "GUILD_DELETE",
            &json!({"id": guild_id.to_string()}),
        );
        Ok(())
    }

    pub fn add_bot_to_guild(&mut self, guild_id: u64) -> Result<(), SimError> {
        let bot = self.guilds.get(&guild_id).map(|g| self.bot_member(g));
        let g = self.guild_mut(guild_id)?;
        if g.bot_present {
            return Ok(());
        }
        g.bot_present = true;
        if let Some(m) = bot {
            g.members.entry(m.user_id).or_insert(m);
        }
        let json = self.guild_create_json(self.guild(guild_id)?);
        self.dispatch(guild_id, "GUILD_CREATE", &json);
        Ok(())
    }
}
