// End-to-end test of the dashboard in a real browser (Debian's chromium driven
// by playwright-core) against a real stack: `observer demo` (simulator +
// worker + api) on a fresh PostgreSQL database.
//
// Environment:
//   OBSERVER_BIN   the observer binary (default: $CARGO_TARGET_DIR or ../target, /debug/observer)
//   DATABASE_URL   admin URL of a PostgreSQL server (default postgres://postgres@127.0.0.1:5432/postgres);
//                  a fresh database is created next to it and dropped afterwards
//   CHROMIUM       browser executable (default /usr/bin/chromium)
//   SCREENSHOT_DIR where dashboard.png / dashboard-360.png go (default /tmp)

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..");
const BIN =
  process.env.OBSERVER_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(repo, "target"), "debug", "observer");
const ADMIN_URL = process.env.DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOT_DIR || "/tmp";

const stack = { proc: null, api: "", sim: "", db: "", dbUrl: "", logs: [] };
let browser;
let scenario;

// ------------------------------------------------------------------ helpers

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value (which is returned). */
async function until(what, fn, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}\n${tailLogs()}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

function tailLogs() {
  return stack.logs.join("").split("\n").slice(-30).join("\n");
}

function psql(sql) {
  execFileSync("psql", [ADMIN_URL, "-v", "ON_ERROR_STOP=1", "-qc", sql], { stdio: "pipe" });
}

async function sim(method, p, body) {
  const res = await fetch(stack.sim + p, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  assert.ok(res.ok, `${method} ${p}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

const post = (channelId, authorId, content) =>
  sim("POST", "/_sim/messages", { channel_id: channelId, author_id: authorId, content });

/** A new browser context logged in as `userId` through the simulator's OAuth. */
async function loginAs(userId) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  // The context's request client shares the browser's cookie jar.
  let r = await ctx.request.get(`${stack.api}/auth/login?next=/`, { maxRedirects: 0 });
  assert.equal(r.status(), 303, await r.text());
  const authorize = r.headers().location;
  assert.ok(authorize.startsWith(stack.sim), authorize);
  r = await ctx.request.get(`${authorize}&login_as=${userId}`, { maxRedirects: 0 });
  const callback = r.headers().location;
  assert.ok(callback && callback.includes("/auth/callback"), `authorize answered ${r.status()}`);
  r = await ctx.request.get(callback, { maxRedirects: 0 });
  assert.ok([302, 303].includes(r.status()), `callback answered ${r.status()}: ${await r.text()}`);
  return ctx;
}

async function gql(ctx, query, variables = {}) {
  const r = await ctx.request.post(`${stack.api}/graphql`, { data: { query, variables } });
  return r.json();
}

async function openDashboard(ctx) {
  const page = await ctx.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  if (process.env.SHOW_LOGS) {
    page.on("response", (r) => console.log(`[browser] ${r.status()} ${r.request().method()} ${r.url()}`));
  }
  page.on("console", (m) => {
    if (process.env.SHOW_LOGS) console.log(`[browser ${m.type()}] ${m.text()}`);
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  await page.goto(`${stack.api}/`);
  // Proves later that updates arrived without a reload.
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  return { page, problems };
}

const randomWord = () =>
  Array.from({ length: 8 }, () => String.fromCharCode(97 + Math.floor(Math.random() * 26))).join("");

function channelNamed(guild, name) {
  const c = guild.channels.find((x) => x.name === name);
  assert.ok(c, `scenario has no channel ${name}`);
  return c;
}

function memberWithOnly(guild, roleName) {
  const role = guild.roles.find((r) => r.name === roleName);
  const m = guild.members.find(
    (x) =>
      x.roles.length === 1 &&
      x.roles[0] === role.id &&
      !x.communication_disabled_until &&
      x.user_id !== guild.owner_id,
  );
  assert.ok(m, `no member with only ${roleName}`);
  return m.user_id;
}

const messageTexts = (page) =>
  page.$$eval("#message-list > li.message > .content", (els) => els.map((e) => e.textContent));

// ------------------------------------------------------------------ stack

before(async () => {
  const [port, simPort] = [await freePort(), await freePort()];
  stack.db = `observer_web_${process.pid}_${Date.now()}`;
  psql(`CREATE DATABASE ${stack.db}`);
  const u = new URL(ADMIN_URL);
  u.pathname = `/${stack.db}`;
  stack.dbUrl = u.toString();
  stack.api = `http://localhost:${port}`;
  stack.sim = `http://127.0.0.1:${simPort}`;
  stack.proc = spawn(
    BIN,
    ["demo", "--port", String(port), "--sim-port", String(simPort), "--traffic-rate", "1"],
    {
      env: { ...process.env, DATABASE_URL: stack.dbUrl, RUST_LOG: "warn", LOG_FORMAT: "json" },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  stack.proc.stdout.on("data", (d) => stack.logs.push(String(d)));
  stack.proc.stderr.on("data", (d) => stack.logs.push(String(d)));
  stack.proc.on("exit", (code) => stack.logs.push(`\n[observer exited: ${code}]\n`));
  await until(
    "observer demo to start",
    async () => {
      if (stack.proc.exitCode !== null) throw new Error("observer demo exited");
      const r = await fetch(`${stack.api}/readyz`);
      return r.ok;
    },
    60000,
  );
  const home = await (await fetch(`${stack.api}/`)).text();
  assert.ok(
    home.includes("/assets/app.js"),
    `${BIN} serves an old dashboard: rebuild it (cargo build -p observer) or set OBSERVER_BIN`,
  );
  scenario = await sim("GET", "/_sim/scenario");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
});

after(async () => {
  if (process.env.SHOW_LOGS) console.log(tailLogs());
  if (browser) await browser.close();
  if (stack.proc && stack.proc.exitCode === null) {
    const exited = new Promise((r) => stack.proc.once("exit", r));
    stack.proc.kill("SIGTERM");
    const timer = setTimeout(() => stack.proc.kill("SIGKILL"), 10000);
    await exited;
    clearTimeout(timer);
  }
  if (stack.db) psql(`DROP DATABASE IF EXISTS ${stack.db} WITH (FORCE)`);
});

// ------------------------------------------------------------------ tests

test("staff viewer: guilds, channel tree, history, live create/edit/delete, search", async () => {
  const guild = scenario.guilds[0];
  const help = channelNamed(guild, "general-help");
  const staffUser = memberWithOnly(guild, "Staff");
  const customer = memberWithOnly(guild, "Customer");
  const tag = randomWord();

  const history = [];
  for (let i = 1; i <= 3; i++) {
    history.push((await post(help.id, customer, `history ${tag} number ${i}`)).id);
  }

  const ctx = await loginAs(staffUser);
  // The worker ingests asynchronously: wait until the API has the history.
  await until("history to be ingested", async () => {
    const r = await gql(
      ctx,
      "query($c: ID!) { messages(channelId: $c, first: 10) { edges { node { content } } } }",
      {
        c: help.id,
      },
    );
    return r.data && r.data.messages.edges.some((e) => e.node.content === `history ${tag} number 3`);
  });

  const { page, problems } = await openDashboard(ctx);
  await page.locator("#viewer-name", { hasText: /\S/ }).waitFor();
  const guildButton = page.locator("#guild-list .guild", { hasText: guild.name });
  await guildButton.click();
  const tree = page.locator("#channel-tree");
  await tree.locator(".channel", { hasText: "general-help" }).waitFor();
  await tree.locator(".channel", { hasText: "staff-chat" }).waitFor();
  assert.ok(await tree.locator(".category h3", { hasText: "Staff" }).count(), "categories shown");

  await tree.locator(".channel", { hasText: "general-help" }).click();
  await page.locator(".message .content", { hasText: `history ${tag} number 3` }).waitFor();
  let texts = await messageTexts(page);
  const i1 = texts.indexOf(`history ${tag} number 1`);
  const i3 = texts.indexOf(`history ${tag} number 3`);
  assert.ok(i1 >= 0 && i1 < i3, `oldest above newest: ${JSON.stringify(texts)}`);

  // Live: created, edited, deleted — no reload.
  await page.locator("#live-status", { hasText: "live" }).waitFor();
  const liveText = `live message ${tag}`;
  const live = await post(help.id, customer, liveText);
  const item = page.locator(`#message-list > li[data-id="${live.id}"]`);
  await item.locator(".content", { hasText: liveText }).waitFor({ timeout: 10000 });
  // The live message is below the history it follows.
  texts = await messageTexts(page);
  assert.ok(texts.indexOf(liveText) > texts.indexOf(`history ${tag} number 3`), JSON.stringify(texts));

  await sim("PATCH", `/_sim/messages/${live.id}`, { content: `corrected message ${tag}` });
  await item.locator(".content", { hasText: `corrected message ${tag}` }).waitFor({ timeout: 10000 });
  await item.locator("button.edited").click();
  await item.locator(".revisions .content", { hasText: liveText }).waitFor();

  await sim("DELETE", `/_sim/messages/${history[1]}`);
  await page.locator(`#message-list > li.deleted[data-id="${history[1]}"]`).waitFor({ timeout: 10000 });
  const struck = await page
    .locator(`#message-list > li[data-id="${history[1]}"] > .content`)
    .evaluate((e) => getComputedStyle(e).textDecorationLine);
  assert.equal(struck, "line-through");
  assert.equal(
    await page.locator(`#message-list > li[data-id="${history[1]}"] > .content`).textContent(),
    `history ${tag} number 2`,
    "tombstone keeps its content for authorised viewers",
  );

  assert.equal(await page.evaluate(() => window.__sameDocument), true, "no reload happened");
  await page.screenshot({ path: path.join(SHOTS, "dashboard.png") });

  // Search.
  await page.fill("#search-input", tag);
  await page.press("#search-input", "Enter");
  await page.locator(".message .content", { hasText: `history ${tag} number 1` }).waitFor({ timeout: 10000 });
  assert.match(await page.textContent("#view-title"), new RegExp(tag));

  // Narrow screens: nothing overflows sideways and the channel drawer opens.
  await page.click("#close-search");
  await tree.locator(".channel", { hasText: "general-help" }).click({ force: true });
  await page.setViewportSize({ width: 360, height: 740 });
  await page.locator(".message .content", { hasText: `corrected message ${tag}` }).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow <= 360, `page is ${overflow}px wide at 360px`);
  assert.equal(await page.locator("#nav").isVisible(), true); // present, but off-screen
  await page.click("#toggle-nav");
  await page.waitForFunction(() => document.body.classList.contains("nav-open"));
  await page.screenshot({ path: path.join(SHOTS, "dashboard-360-nav.png"), animations: "disabled" });
  await tree.locator(".channel", { hasText: "general-help" }).click();
  await page.waitForFunction(() => !document.body.classList.contains("nav-open"));
  await page.screenshot({ path: path.join(SHOTS, "dashboard-360.png"), animations: "disabled" });

  assert.deepEqual(problems, [], "no page errors");
  await ctx.close();
});

test("customer: staff channels and their messages stay invisible, live and in search", async () => {
  const guild = scenario.guilds[0];
  const help = channelNamed(guild, "general-help");
  const staffChat = channelNamed(guild, "staff-chat");
  const staffUser = memberWithOnly(guild, "Staff");
  const customer = memberWithOnly(guild, "Customer");
  const tag = randomWord();

  const ctx = await loginAs(customer);
  const staffCtx = await loginAs(staffUser);
  const { page, problems } = await openDashboard(ctx);
  await page.locator("#guild-list .guild", { hasText: guild.name }).click();
  const tree = page.locator("#channel-tree");
  await tree.locator(".channel", { hasText: "general-help" }).waitFor();
  assert.equal(await tree.locator(".channel", { hasText: "staff-chat" }).count(), 0);
  assert.equal(await tree.locator(".channel", { hasText: "escalations" }).count(), 0);

  // The whole-guild live view: make sure the subscription runs (a marker
  // arrives), then post a staff message followed by a second marker. Events
  // come in log order, so once the second marker is shown the staff message
  // would have been too, had it been visible.
  await page.locator("#live-status", { hasText: "live" }).waitFor();
  await until("the live view to receive a marker", async () => {
    const m = await post(help.id, customer, `marker one ${tag}`);
    return page
      .locator(`#message-list > li[data-id="${m.id}"]`)
      .waitFor({ timeout: 1500 })
      .then(() => true);
  });
  const secret = await post(staffChat.id, staffUser, `confidential ${tag} escalation`);
  const marker = await post(help.id, customer, `marker two ${tag}`);
  await page.locator(`#message-list > li[data-id="${marker.id}"]`).waitFor({ timeout: 10000 });
  assert.equal(await page.locator(`#message-list > li[data-id="${secret.id}"]`).count(), 0);
  assert.ok(!(await page.textContent("#message-list")).includes("confidential"));

  // A deep link to the staff channel does not open it.
  await page.goto(`${stack.api}/?channel=${staffChat.id}`);
  await page.locator("#guild-list .guild.selected").waitFor();
  assert.ok(!(await page.textContent("#view-title")).includes("staff-chat"));
  await page.locator("#guild-list .guild", { hasText: guild.name }).click();

  // Search: staff find the message, the customer does not.
  await until("the staff message to be searchable", async () => {
    const r = await gql(
      staffCtx,
      "query($q: String!) { searchMessages(query: $q) { edges { node { id } } } }",
      {
        q: tag,
      },
    );
    return r.data && r.data.searchMessages.edges.some((e) => e.node.id === secret.id);
  });
  await page.fill("#search-input", `confidential ${tag}`);
  await page.press("#search-input", "Enter");
  await page.locator("#history-status", { hasText: "No messages found" }).waitFor({ timeout: 10000 });
  await page.fill("#search-input", `marker ${tag}`);
  await page.press("#search-input", "Enter");
  await page.locator(".message .content", { hasText: `marker two ${tag}` }).waitFor({ timeout: 10000 });

  assert.deepEqual(problems, [], "no page errors");
  await staffCtx.close();
  await ctx.close();
});

test("history: the newest page first, older pages load on scroll up", async () => {
  const guild = scenario.guilds[0];
  const bugs = channelNamed(guild, "bug-reports");
  const staffUser = memberWithOnly(guild, "Staff");
  const tag = randomWord();
  const total = 75;
  for (let i = 1; i <= total; i++) await post(bugs.id, staffUser, `page ${tag} item ${i}`);

  const ctx = await loginAs(staffUser);
  await until("the backlog to be ingested", async () => {
    const r = await gql(
      ctx,
      "query($c: ID!) { messages(channelId: $c, first: 1) { edges { node { content } } } }",
      {
        c: bugs.id,
      },
    );
    return r.data && r.data.messages.edges[0].node.content === `page ${tag} item ${total}`;
  });
  const { page, problems } = await openDashboard(ctx);
  await page.goto(`${stack.api}/?channel=${bugs.id}`);
  await page.locator(".message .content", { hasText: `page ${tag} item ${total}` }).waitFor();
  const mine = async () => (await messageTexts(page)).filter((t) => t.startsWith(`page ${tag} `));
  const firstPage = await mine();
  assert.ok(!firstPage.includes(`page ${tag} item 1`), "the oldest is not on the first page");
  assert.equal(firstPage[firstPage.length - 1], `page ${tag} item ${total}`, "newest at the bottom");
  // The view sits at the bottom; scrolling to the top fetches older pages.
  const atBottom = await page.$eval("#messages", (e) => e.scrollHeight - e.scrollTop - e.clientHeight < 80);
  assert.ok(atBottom, "opens scrolled to the newest message");
  await until(
    "older pages to load on scroll",
    async () => {
      await page.$eval("#messages", (e) => {
        e.scrollTop = 0;
      });
      return (await mine()).includes(`page ${tag} item 1`);
    },
    15000,
  );
  const all = await mine();
  assert.deepEqual(
    all,
    Array.from({ length: total }, (_, i) => `page ${tag} item ${i + 1}`),
    "every message once, in order",
  );
  assert.deepEqual(problems, [], "no page errors");
  await ctx.close();
});

test("live view resumes after a dropped WebSocket, from its last cursor", async () => {
  const guild = scenario.guilds[0];
  const help = channelNamed(guild, "general-help");
  const staffUser = memberWithOnly(guild, "Staff");
  const customer = memberWithOnly(guild, "Customer");
  const tag = randomWord();

  const ctx = await loginAs(staffUser);
  const page = await ctx.newPage();
  // Route the page's WebSockets through the test, so it can cut one.
  const sockets = [];
  const subscribes = [];
  await page.routeWebSocket(/\/graphql$/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => {
      try {
        const msg = JSON.parse(String(m));
        if (msg.type === "subscribe") subscribes.push(msg.payload.variables || {});
      } catch {
        /* not JSON: forward as is */
      }
      server.send(m);
    });
    sockets.push(ws);
  });
  await page.goto(`${stack.api}/?channel=${help.id}`);
  await page.locator("#live-status", { hasText: "live" }).waitFor();
  const first = await post(help.id, customer, `before the drop ${tag}`);
  await page.locator(`#message-list > li[data-id="${first.id}"]`).waitFor({ timeout: 10000 });

  await sockets[sockets.length - 1].close({ code: 1006 });
  await page.locator("#live-status", { hasText: /reconnecting|connecting/ }).waitFor();
  const during = await post(help.id, customer, `during the drop ${tag}`);
  await page.locator("#live-status", { hasText: "live" }).waitFor({ timeout: 15000 });
  await page.locator(`#message-list > li[data-id="${during.id}"]`).waitFor({ timeout: 10000 });
  const afterwards = await post(help.id, customer, `after the drop ${tag}`);
  await page.locator(`#message-list > li[data-id="${afterwards.id}"]`).waitFor({ timeout: 10000 });

  assert.ok(sockets.length >= 2, "the client reconnected");
  const resumed = subscribes[subscribes.length - 1];
  assert.ok(resumed.after, `resubscribed with a cursor: ${JSON.stringify(subscribes)}`);
  for (const m of [first, during, afterwards]) {
    assert.equal(await page.locator(`#message-list > li[data-id="${m.id}"]`).count(), 1);
  }
  await ctx.close();
});

test("anonymous visitor gets the login button; GraphiQL loads from the binary", async () => {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const external = [];
  page.on("request", (r) => {
    const u = new URL(r.url());
    if (u.hostname !== "localhost" && u.protocol !== "data:") external.push(r.url());
  });
  await page.goto(`${stack.api}/`);
  const login = page.locator("a", { hasText: "Log in with Discord" });
  await login.waitFor();
  assert.equal(await login.getAttribute("href"), "/auth/login?next=/");

  await page.goto(`${stack.api}/graphql`);
  await page.locator(".graphiql-container").waitFor({ timeout: 15000 });
  await page.locator(".graphiql-execute-button").click();
  // Anonymous: the API answers with UNAUTHENTICATED, shown by GraphiQL.
  await page.locator(".result-window", { hasText: "UNAUTHENTICATED" }).waitFor({ timeout: 10000 });
  assert.deepEqual(external, [], "no request leaves the server (no CDN)");
  await ctx.close();
});
