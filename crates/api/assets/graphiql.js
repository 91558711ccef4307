// Minimal query page: POSTs the editor's query to /graphql with the session
// cookie (or an API token) and shows the JSON answer as text (never as HTML).
(function () {
  "use strict";
  var q = document.getElementById("query");
  var v = document.getElementById("variables");
  var out = document.getElementById("result");
  var tok = document.getElementById("token");
  function run() {
    var vars = {};
    try { vars = v.value.trim() ? JSON.parse(v.value) : {}; }
    catch (e) { out.textContent = "variables are not valid JSON: " + e.message; return; }
    var headers = { "content-type": "application/json" };
    if (tok.value) { headers.authorization = "Bearer " + tok.value; }
    out.textContent = "…";
    fetch("/graphql", {
      method: "POST", headers: headers, credentials: "same-origin",
      body: JSON.stringify({ query: q.value, variables: vars })
    }).then(function (r) { return r.text(); })
      .then(function (t) {
        try { out.textContent = JSON.stringify(JSON.parse(t), null, 2); }
        catch (e) { out.textContent = t; }
      })
      .catch(function (e) { out.textContent = "request failed: " + e; });
  }
  document.getElementById("run").addEventListener("click", run);
  document.addEventListener("keydown", function (e) {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { run(); }
  });
})();
