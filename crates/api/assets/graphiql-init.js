// Boots the vendored GraphiQL (UMD globals React, ReactDOM, GraphiQL) against
// this server: HTTP on /graphql with the session cookie, subscriptions over
// graphql-transport-ws on the same path. Lives in a file because the page's
// CSP forbids inline scripts.
(function () {
  "use strict";
  var loc = window.location;
  var wsUrl = (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/graphql";

  var base = GraphiQL.createFetcher({ url: "/graphql", subscriptionUrl: wsUrl });

  // Headers typed in GraphiQL's header editor travel as HTTP headers and, for
  // subscriptions, as connection_init params, where the server looks for the
  // lowercase key "authorization".
  function fetcher(params, opts) {
    var o = opts || {};
    if (o.headers) {
      var lower = {};
      Object.keys(o.headers).forEach(function (k) { lower[k.toLowerCase()] = o.headers[k]; });
      o = Object.assign({}, o, { headers: lower });
    }
    return base(params, o);
  }

  var defaultQuery = [
    "# Logged in through the dashboard? The session cookie is used.",
    "# Scripts: put {\"authorization\": \"Bearer so_...\"} in Headers below.",
    "query Overview {",
    "  viewer { id username }",
    "  guilds { id name channels { id name kind parentId } }",
    "}",
    "",
    "# subscription Live { messageEvents { kind cursor message { id channelId content author { username } } } }",
    ""
  ].join("\n");

  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(React.createElement(GraphiQL, {
    fetcher: fetcher,
    defaultQuery: defaultQuery,
    defaultEditorToolsVisibility: false,
    shouldPersistHeaders: false
  }));

  // Small header nicety: show who is logged in (text only, never HTML).
  fetch("/graphql", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query: "{ viewer { username } }" })
  }).then(function (r) { return r.json(); }).then(function (r) {
    if (r && r.data && r.data.viewer) {
      document.getElementById("so-who").textContent = "logged in as " + r.data.viewer.username;
      document.getElementById("so-login").hidden = true;
    }
  }).catch(function () { /* anonymous: the login link stays */ });
})();
