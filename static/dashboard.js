/* The dashboard: live numbers from /api/v1/stats (SSE, once a second) as small charts, and a
 * stream explorer that tails any stream the viewer's token grants (with sluice.js). */
(function () {
  "use strict";
  var POINTS = 60;
  var CHARTS = [
    {key: "connections", title: "Connections (SSE + poll)", value: function (s) { return s.sse + s.poll; }},
    {key: "ingest", title: "Ingest, events/s", rate: "events_in"},
    {key: "deliveries", title: "Deliveries/s", rate: "deliveries"},
    {key: "flush", title: "Batch flush, ms", value: function (s, p) {
      if (!p || s.flushes === p.flushes) return 0;
      return 1000 * (s.flush_seconds - p.flush_seconds) / (s.flushes - p.flushes);
    }},
    {key: "pool", title: "Pool in use", value: function (s) { return s.pool_in_use; },
     suffix: function (s) { return " / " + s.pool_size; }},
    {key: "backlog", title: "Backlog, events", value: function (s) { return s.backlog; }},
  ];
  var series = {};
  var previous = null;
  var stats = null;
  var tail = null;
  var $ = function (id) { return document.getElementById(id); };

  function build() {
    var root = $("charts");
    CHARTS.forEach(function (c) {
      series[c.key] = [];
      var card = document.createElement("div");
      card.className = "card";
      card.id = "chart-" + c.key;
      card.innerHTML = '<h2></h2><div class="value">–</div>' +
        '<svg viewBox="0 0 ' + (POINTS - 1) + ' 40" preserveAspectRatio="none"><polyline points=""/></svg>';
      card.querySelector("h2").textContent = c.title;
      root.appendChild(card);
    });
  }

  function format(n) {
    if (n >= 100) return Math.round(n).toLocaleString();
    return (Math.round(n * 10) / 10).toString();
  }

  function draw(c, s) {
    var data = series[c.key];
    var max = Math.max.apply(null, data.concat([1]));
    var step = (POINTS - 1) / Math.max(1, data.length - 1);  // spread what there is
    var points = data.map(function (v, i) {
      return (i * step).toFixed(2) + "," + (39 - 37 * v / max).toFixed(1);
    }).join(" ");
    var card = $("chart-" + c.key);
    card.querySelector("polyline").setAttribute("points", points);
    var last = data.length ? data[data.length - 1] : 0;
    card.querySelector(".value").textContent = format(last) + (c.suffix ? c.suffix(s) : "");
    card.dataset.samples = String(data.length);
    card.dataset.last = String(last);
  }

  function onStats(s) {
    var dt = previous ? Math.max(0.001, s.time - previous.time) : 1;
    CHARTS.forEach(function (c) {
      var v = c.rate ? (previous ? Math.max(0, (s[c.rate] - previous[c.rate]) / dt) : 0)
                     : c.value(s, previous);
      series[c.key].push(v);
      if (series[c.key].length > POINTS) series[c.key].shift();
      draw(c, s);
    });
    previous = s;
    $("status").textContent = "live · " + s.processes + " process" + (s.processes === 1 ? "" : "es");
    $("status").className = "live";
  }

  function connect() {
    var token = $("token").value.trim();
    if (!token) return;
    try { localStorage.setItem("sluice-token", token); } catch (e) { /* private mode */ }
    if (stats) stats.close();
    previous = null;
    stats = new EventSource("/api/v1/stats?token=" + encodeURIComponent(token));
    stats.addEventListener("stats", function (e) { onStats(JSON.parse(e.data)); });
    stats.onerror = function () {
      $("status").textContent = stats.readyState === 2 ? "refused (check the token)" : "reconnecting…";
      $("status").className = stats.readyState === 2 ? "error" : "";
    };
  }

  function startTail(event) {
    event.preventDefault();
    var name = $("stream").value.trim();
    var token = $("token").value.trim();
    if (!name || !token) return;
    if (tail) tail.close();
    $("tail").innerHTML = "";
    $("tail-status").textContent = "";
    $("tail-status").className = "";
    tail = Sluice.subscribe({
      streams: [name], token: token, lastEventId: "0",
      onEvent: function (e) {
        var li = document.createElement("li");
        li.innerHTML = '<span class="id"></span><span class="type"></span><span class="data"></span>';
        li.querySelector(".id").textContent = e.id;
        li.querySelector(".type").textContent = e.type;
        li.querySelector(".data").textContent = JSON.stringify(e.data);
        var list = $("tail");
        list.insertBefore(li, list.firstChild);
        while (list.children.length > 200) list.removeChild(list.lastChild);
      },
      onReset: function (notice) {  // retention pruned the start: say where history begins
        var li = document.createElement("li");
        li.className = "reset";
        li.textContent = "history before " + (notice.oldest ? "#" + notice.oldest : "now") +
          " is gone (" + notice.reason + ": " + notice.streams.join(", ") + ")";
        var list = $("tail");
        list.insertBefore(li, list.firstChild);
      },
      onStatus: function (s) { if (s !== "closed") $("tail-status").textContent = s; },
      onError: function (p) {
        $("tail-status").textContent = (p.status || "") + " " + (p.detail || "refused");
        $("tail-status").className = "error";
      },
    });
  }

  build();
  window.sluiceDashboard = {series: series};  // for tests and the curious
  var fromQuery = new URLSearchParams(location.search).get("token");
  var saved = null;
  try { saved = localStorage.getItem("sluice-token"); } catch (e) { /* private mode */ }
  $("token").value = fromQuery || saved || "";
  $("connect").addEventListener("click", connect);
  $("tail-form").addEventListener("submit", startTail);
  if ($("token").value) connect();
})();
