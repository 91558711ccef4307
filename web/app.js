// Support Observer dashboard: guilds → channel tree → message stream.
//
// Data comes from /graphql (session cookie) and live events from the
// messageEvents subscription over graphql-transport-ws. Every piece of data
// is rendered with textContent / DOM properties, never innerHTML: message
// text is written by arbitrary Discord users.

import { GraphQLWsClient } from "./gqlws.js";

const PAGE = 50;

const MESSAGE_FIELDS = `
  id guildId channelId content createdAt editedAt deletedAt deletionDetectedAt replyToId
  author { id username displayName bot }
  attachments { id filename url size contentType }
  revisions { content editedAt }
`;

const $ = (id) => document.getElementById(id);

const state = {
  viewer: null,
  guilds: [],
  channels: new Map(), // id -> channel (all guilds)
  guildId: null,
  channelId: null, // null = whole-guild live view
  messages: new Map(), // id -> {node, el}
  cursor: null, // endCursor for the next older page
  hasMore: false,
  loading: false,
  lastEventCursor: null,
  unsubscribe: null,
  viewToken: 0, // bumps on every view change; late answers for old views are dropped
  searching: false,
};

// ---------------------------------------------------------------- GraphQL

class GqlError extends Error {
  constructor(errors) {
    super(errors.map((e) => e.message).join("; "));
    this.codes = errors.map((e) => (e.extensions && e.extensions.code) || "");
  }
}

async function gql(query, variables = {}) {
  const res = await fetch("/graphql", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query, variables }),
  });
  let body;
  try {
    body = await res.json();
  } catch {
    throw new Error(`HTTP ${res.status}`);
  }
  if (body.errors && body.errors.length) throw new GqlError(body.errors);
  return body.data;
}

// ---------------------------------------------------------------- helpers

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function snowflakeCmp(a, b) {
  const x = BigInt(a);
  const y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
function fmtTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : timeFmt.format(d);
}

function fmtSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// Only http(s) links become clickable: a javascript: URL in an attachment
// would otherwise run in our origin.
function safeUrl(url) {
  try {
    const u = new URL(url, window.location.href);
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
  } catch {
    return null;
  }
}

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
}

function setLiveStatus(s) {
  const e = $("live-status");
  e.textContent = s;
  e.dataset.status = s;
}

// ---------------------------------------------------------------- channel tree

// Plain symbols present in every system font (emoji fonts are not a given).
const CHANNEL_ICON = {
  TEXT: "#",
  ANNOUNCEMENT: "!",
  FORUM: "≡",
  MEDIA: "▣",
  VOICE: "♪",
  STAGE: "♪",
  PUBLIC_THREAD: "↳",
  PRIVATE_THREAD: "↳",
  ANNOUNCEMENT_THREAD: "↳",
  OTHER: "•",
};

function byPosition(a, b) {
  return a.position - b.position || snowflakeCmp(a.id, b.id);
}

function renderGuilds() {
  const list = $("guild-list");
  list.replaceChildren();
  for (const g of state.guilds) {
    const li = el("li");
    const b = el("button", "guild", g.name);
    b.type = "button";
    b.dataset.guildId = g.id;
    if (g.id === state.guildId) b.classList.add("selected");
    b.addEventListener("click", () => selectGuild(g.id));
    li.append(b);
    list.append(li);
  }
  if (!state.guilds.length) list.append(el("li", "muted small", "No guilds visible to you."));
}

function channelButton(c, depth) {
  const b = el("button", `channel depth-${depth}`);
  b.type = "button";
  b.dataset.channelId = c.id;
  b.dataset.kind = c.kind;
  b.append(el("span", "icon", CHANNEL_ICON[c.kind] || "#"), el("span", "name", c.name));
  if (c.kind === "PRIVATE_THREAD") b.append(el("span", "tag", "private"));
  // Only managers get a non-null botCanRead: tell them why the channel stays empty.
  if (c.botCanRead === false) {
    b.append(el("span", "tag", "bot cannot read"));
    b.title = "The bot cannot read this channel: Discord denies it VIEW_CHANNEL (or CONNECT)";
  }
  if (c.id === state.channelId) b.classList.add("selected");
  b.addEventListener("click", () => selectChannel(c.id));
  return b;
}

function renderChannelTree() {
  const tree = $("channel-tree");
  tree.replaceChildren();
  const guild = state.guilds.find((g) => g.id === state.guildId);
  if (!guild) return;

  const all = guild.channels.filter((c) => c.kind !== "VOICE" && c.kind !== "STAGE");
  const ids = new Set(all.map((c) => c.id));
  const children = new Map();
  for (const c of all) {
    // A parent we cannot see is as good as none: show the child at top level.
    const p = c.parentId && ids.has(c.parentId) ? c.parentId : "";
    if (!children.has(p)) children.set(p, []);
    children.get(p).push(c);
  }
  for (const list of children.values()) list.sort(byPosition);

  const whole = el("button", "channel all-channels", "All channels (live)");
  whole.type = "button";
  if (state.channelId === null) whole.classList.add("selected");
  whole.addEventListener("click", () => selectGuild(guild.id));
  tree.append(whole);

  const addWithThreads = (container, c, depth) => {
    container.append(channelButton(c, depth));
    for (const t of children.get(c.id) || []) addWithThreads(container, t, depth + 1);
  };
  const top = children.get("") || [];
  // Uncategorised channels first, as Discord shows them.
  for (const c of top.filter((c) => c.kind !== "CATEGORY")) addWithThreads(tree, c, 0);
  for (const cat of top.filter((c) => c.kind === "CATEGORY")) {
    const section = el("section", "category");
    section.append(el("h3", null, cat.name));
    for (const c of children.get(cat.id) || []) addWithThreads(section, c, 0);
    tree.append(section);
  }
}

function markSelected() {
  for (const b of document.querySelectorAll("#guild-list .guild")) {
    b.classList.toggle("selected", b.dataset.guildId === state.guildId);
  }
  renderChannelTree();
}

// ---------------------------------------------------------------- messages

function renderMessage(m, showChannel) {
  const li = el("li", "message");
  li.dataset.id = m.id;
  li.dataset.channelId = m.channelId;
  const head = el("div", "meta");
  const name = m.author.displayName || m.author.username;
  head.append(el("span", "author", name));
  if (m.author.bot) head.append(el("span", "badge", "bot"));
  if (showChannel) {
    const c = state.channels.get(m.channelId);
    const link = el("button", "channel-link", `#${c ? c.name : m.channelId}`);
    link.type = "button";
    link.addEventListener("click", () => selectChannel(m.channelId, m.guildId));
    head.append(link);
  }
  const time = el("time", "time", fmtTime(m.createdAt));
  time.dateTime = m.createdAt;
  head.append(time);
  if (m.editedAt) {
    const edited = el("button", "edited", "(edited)");
    edited.type = "button";
    edited.title = `edited ${fmtTime(m.editedAt)} — show history`;
    edited.setAttribute("aria-expanded", "false");
    edited.addEventListener("click", () => {
      const open = li.querySelector(".revisions");
      if (open) {
        open.remove();
        edited.setAttribute("aria-expanded", "false");
        return;
      }
      edited.setAttribute("aria-expanded", "true");
      const ol = el("ol", "revisions");
      if (!m.revisions.length) ol.append(el("li", "muted", "No earlier versions stored."));
      for (const r of m.revisions) {
        const rli = el("li");
        rli.append(el("time", "time", fmtTime(r.editedAt)), el("div", "content", r.content));
        ol.append(rli);
      }
      li.append(ol);
    });
    head.append(edited);
  }
  if (m.deletedAt) {
    li.classList.add("deleted");
    head.append(el("span", "badge danger", `deleted ${fmtTime(m.deletedAt)}`));
  } else if (m.deletionDetectedAt) {
    // Deleted while the observer was not connected: only when it was noticed is known.
    li.classList.add("deleted");
    const badge = el("span", "badge danger", `deleted (noticed ${fmtTime(m.deletionDetectedAt)})`);
    badge.title = "Deleted in Discord while the observer was offline; the exact time is unknown.";
    head.append(badge);
  }
  li.append(head);
  li.append(el("div", "content", m.content));
  if (m.attachments.length) {
    const ul = el("ul", "attachments");
    for (const a of m.attachments) {
      const ali = el("li");
      const href = safeUrl(a.url);
      const label = `Attachment: ${a.filename} (${fmtSize(a.size)})`;
      if (href) {
        const link = el("a", null, label);
        link.href = href;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        ali.append(link);
      } else {
        ali.append(el("span", null, label));
      }
      ul.append(ali);
    }
    li.append(ul);
  }
  return li;
}

function isNearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

/** Inserts or replaces a message, keeping the list ordered by id (= time). */
function upsertMessage(m) {
  const list = $("message-list");
  const showChannel = state.channelId === null;
  const existing = state.messages.get(m.id);
  const node = renderMessage(m, showChannel);
  if (existing) {
    existing.el.replaceWith(node);
    state.messages.set(m.id, { node: m, el: node });
    return;
  }
  state.messages.set(m.id, { node: m, el: node });
  // New messages almost always belong at the end: scan from there.
  let after = list.lastElementChild;
  while (after && snowflakeCmp(after.dataset.id, m.id) > 0) after = after.previousElementSibling;
  if (after) after.after(node);
  else list.prepend(node);
}

function resetMessages() {
  state.messages.clear();
  state.cursor = null;
  state.hasMore = false;
  state.loading = false;
  $("message-list").replaceChildren();
  $("history-status").textContent = "";
}

async function loadOlder() {
  const token = state.viewToken;
  const channelId = state.channelId;
  if (!channelId || state.loading || !state.hasMore) return;
  state.loading = true;
  $("history-status").textContent = "Loading history…";
  const box = $("messages");
  const before = box.scrollHeight - box.scrollTop;
  try {
    const data = await gql(
      `query History($c: ID!, $first: Int, $after: String) {
        messages(channelId: $c, first: $first, after: $after) {
          edges { cursor node { ${MESSAGE_FIELDS} } }
          pageInfo { hasNextPage endCursor }
          eventCursor
        }
      }`,
      { c: channelId, first: PAGE, after: state.cursor },
    );
    if (token !== state.viewToken) return;
    const conn = data.messages;
    const first = state.cursor === null;
    for (const e of conn.edges) {
      // A live event may already have brought a newer state of this message.
      if (!state.messages.has(e.node.id)) upsertMessage(e.node);
    }
    state.cursor = conn.pageInfo.endCursor;
    state.hasMore = conn.pageInfo.hasNextPage;
    $("history-status").textContent = state.hasMore
      ? "Scroll up for older messages"
      : state.messages.size
        ? "Beginning of history"
        : "No messages yet";
    if (first) {
      scrollToBottom();
      // Live from where the page was read: the server replays whatever
      // changed since, so nothing falls between the page and the stream.
      subscribe(conn.eventCursor);
    } else box.scrollTop = box.scrollHeight - before;
  } catch (e) {
    if (token === state.viewToken) {
      showBanner(`Could not load history: ${e.message}`);
      // Still show what happens from now on.
      if (!state.unsubscribe) subscribe();
    }
  } finally {
    if (token === state.viewToken) state.loading = false;
  }
  // Keep loading until the view is filled, so scrolling up has something to do.
  if (token === state.viewToken && state.hasMore && box.scrollHeight <= box.clientHeight) {
    loadOlder();
  }
}

// ---------------------------------------------------------------- live events

let wsClient = null;

function wsUrl() {
  const loc = window.location;
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/graphql`;
}

// `after`: an event cursor to resume from (a history page's eventCursor);
// without one the stream starts "from now".
function subscribe(after = null) {
  if (state.unsubscribe) state.unsubscribe();
  state.unsubscribe = null;
  state.lastEventCursor = after;
  if (!state.guildId) return;
  const token = state.viewToken;
  const scope = state.channelId ? { channelIds: [state.channelId] } : { guildId: state.guildId };
  let failures = 0;
  const start = () => {
    state.unsubscribe = wsClient.subscribe(
      () => ({
        query: `subscription Live($guildId: ID, $channelIds: [ID!], $after: String) {
          messageEvents(guildId: $guildId, channelIds: $channelIds, after: $after) {
            kind cursor message { ${MESSAGE_FIELDS} }
          }
        }`,
        // On reconnect, resume after the last event we saw.
        variables: { ...scope, after: state.lastEventCursor },
      }),
      {
        next: (payload) => {
          if (token !== state.viewToken) return;
          if (payload.errors && payload.errors.length) {
            showBanner(`Live updates: ${payload.errors.map((e) => e.message).join("; ")}`);
            return;
          }
          const ev = payload.data && payload.data.messageEvents;
          if (!ev) return;
          state.lastEventCursor = ev.cursor;
          failures = 0;
          if (!state.channels.has(ev.message.channelId)) refreshChannelsSoon(ev.message.channelId);
          const stick = isNearBottom();
          upsertMessage(ev.message);
          if (stick) scrollToBottom();
        },
        error: (errors) => resume(errors),
        // A stream the server completes is resumed too, with the same backoff.
        complete: () => resume([{ message: "subscription completed by the server" }]),
      },
    );
  };
  const resume = (errors) => {
    if (token !== state.viewToken) return;
    const list = Array.isArray(errors) ? errors : [{ message: String(errors) }];
    const msg = list.map((e) => e.message).join("; ");
    if (list.some((e) => e.extensions && e.extensions.code === "UNAUTHENTICATED")) {
      setLiveStatus("offline");
      showBanner("Your session has ended: reload the page to log in again.");
      return;
    }
    // The server ends a subscription that fell behind (or hit a
    // transient error): resume from our cursor, backing off if it repeats.
    failures += 1;
    setLiveStatus("resuming");
    setTimeout(
      () => {
        if (token !== state.viewToken) return;
        start();
        if (wsClient.acked) setLiveStatus("live");
      },
      Math.min(30000, 500 * 2 ** Math.min(failures, 6)),
    );
    console.warn("subscription ended, resuming:", msg);
  };
  start();
}

// A message in a channel we do not know yet (a new thread, say): reload the
// channel list once, shortly, rather than on every such event.
let refreshTimer = null;
const refreshedFor = new Set();
function refreshChannelsSoon(channelId) {
  if (refreshTimer || refreshedFor.has(channelId)) return;
  refreshedFor.add(channelId);
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    try {
      await loadGuilds();
      renderGuilds();
      renderChannelTree();
    } catch (e) {
      console.warn("could not refresh channels:", e.message);
    }
  }, 2000);
}

async function loadGuilds() {
  const data = await gql(
    `{ guilds { id name iconUrl channels { id guildId parentId name kind position botCanRead } } }`,
  );
  state.guilds = data.guilds;
  state.channels.clear();
  for (const g of state.guilds) for (const c of g.channels) state.channels.set(c.id, c);
}

// ---------------------------------------------------------------- views

function closeNavOnMobile() {
  document.body.classList.remove("nav-open");
  $("toggle-nav").setAttribute("aria-expanded", "false");
}

function updateLocation() {
  const params = new URLSearchParams();
  if (state.guildId) params.set("guild", state.guildId);
  if (state.channelId) params.set("channel", state.channelId);
  const q = params.toString();
  history.replaceState(null, "", q ? `/?${q}` : "/");
}

function selectGuild(guildId) {
  const guild = state.guilds.find((g) => g.id === guildId);
  if (!guild) return;
  state.viewToken += 1;
  state.guildId = guildId;
  state.channelId = null;
  leaveSearch();
  resetMessages();
  showBanner("");
  markSelected();
  $("view-title").textContent = guild.name;
  $("view-sub").textContent = "live events from every channel you can see";
  $("history-status").textContent = "Waiting for new messages… (pick a channel for its history)";
  updateLocation();
  subscribe();
  closeNavOnMobile();
}

function selectChannel(channelId, guildId) {
  const c = state.channels.get(channelId);
  const gid = guildId || (c && c.guildId);
  if (!gid) return;
  state.viewToken += 1;
  state.guildId = gid;
  state.channelId = channelId;
  leaveSearch();
  resetMessages();
  showBanner("");
  markSelected();
  $("view-title").textContent = c ? `${CHANNEL_ICON[c.kind] || "#"} ${c.name}` : channelId;
  const g = state.guilds.find((x) => x.id === gid);
  $("view-sub").textContent =
    (g ? g.name : "") +
    (c && c.botCanRead === false ? " · the bot cannot read this channel" : "");
  updateLocation();
  state.hasMore = true;
  if (state.unsubscribe) state.unsubscribe();
  state.unsubscribe = null;
  // The first page subscribes from its eventCursor (see loadOlder).
  loadOlder();
  closeNavOnMobile();
}

// ---------------------------------------------------------------- search

function leaveSearch() {
  if (!state.searching) return;
  state.searching = false;
  $("close-search").hidden = true;
  $("messages").classList.remove("search-results");
}

async function runSearch(query) {
  state.viewToken += 1;
  const token = state.viewToken;
  if (state.unsubscribe) state.unsubscribe();
  state.unsubscribe = null;
  resetMessages();
  showBanner("");
  state.searching = true;
  state.channelId = null;
  markSelected();
  $("messages").classList.add("search-results");
  $("close-search").hidden = false;
  $("view-title").textContent = `Search: ${query}`;
  const g = state.guilds.find((x) => x.id === state.guildId);
  $("view-sub").textContent = g ? `in ${g.name}` : "in all guilds";
  $("history-status").textContent = "Searching…";
  try {
    const data = await gql(
      `query Search($q: String!, $g: ID) {
        searchMessages(query: $q, guildId: $g, first: 25) {
          edges { node { ${MESSAGE_FIELDS} } }
        }
      }`,
      { q: query, g: state.guildId },
    );
    if (token !== state.viewToken) return;
    const list = $("message-list");
    // Best match first, as the server ranks them.
    for (const e of data.searchMessages.edges) {
      const node = renderMessage(e.node, true);
      state.messages.set(e.node.id, { node: e.node, el: node });
      list.append(node);
    }
    $("history-status").textContent = data.searchMessages.edges.length
      ? `${data.searchMessages.edges.length} result(s), best match first`
      : "No messages found";
    $("messages").scrollTop = 0;
  } catch (e) {
    if (token === state.viewToken) {
      $("history-status").textContent = "";
      showBanner(`Search failed: ${e.message}`);
    }
  }
}

// ---------------------------------------------------------------- boot

async function boot() {
  let viewer;
  try {
    viewer = (await gql("{ viewer { id username avatarUrl } }")).viewer;
  } catch (e) {
    if (e instanceof GqlError && e.codes.includes("UNAUTHENTICATED")) {
      $("login-view").hidden = false;
      return;
    }
    $("login-view").hidden = false;
    const p = el("p", "banner", `The API is not answering: ${e.message}`);
    $("login-view").append(p);
    return;
  }
  state.viewer = viewer;
  $("app-view").hidden = false;
  $("viewer-name").textContent = viewer.username;

  wsClient = new GraphQLWsClient(wsUrl(), { onStatus: setLiveStatus });

  $("logout").addEventListener("click", async () => {
    try {
      await fetch("/auth/logout", { method: "POST", credentials: "same-origin" });
    } finally {
      window.location.assign("/");
    }
  });
  $("toggle-nav").addEventListener("click", () => {
    const open = document.body.classList.toggle("nav-open");
    $("toggle-nav").setAttribute("aria-expanded", String(open));
  });
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("search-input").value.trim();
    if (q) runSearch(q);
  });
  $("close-search").addEventListener("click", () => {
    $("search-input").value = "";
    if (state.guildId) selectGuild(state.guildId);
  });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 120 && !state.searching) loadOlder();
  });

  try {
    await loadGuilds();
  } catch (e) {
    showBanner(`Could not load guilds: ${e.message}`);
    return;
  }
  renderGuilds();

  const params = new URLSearchParams(window.location.search);
  const wantChannel = params.get("channel");
  const wantGuild = params.get("guild");
  if (wantChannel && state.channels.has(wantChannel)) selectChannel(wantChannel);
  else if (wantGuild && state.guilds.some((g) => g.id === wantGuild)) selectGuild(wantGuild);
  else if (state.guilds.length) selectGuild(state.guilds[0].id);
}

boot();
