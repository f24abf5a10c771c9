/* The dashboard: live numbers from /api/v1/stats (SSE, once a second) as charts with axes and
 * units, tables of the busiest streams and of the processes, a form that publishes a test event
 * with the viewer's token, and a stream explorer that tails any stream the token grants (with
 * sluice.js). */
(function () {
  "use strict";
  var POINTS = 60;           // one a second: the charts show the last minute
  var W = 300, H = 112, LEFT = 40, RIGHT = 6, TOP = 8, BOTTOM = 18;  // chart geometry (px)
  var CHARTS = [
    {key: "connections", title: "SSE + long-poll", unit: "connections",
     value: function (s) { return s.sse + s.poll; }},
    {key: "ingest", title: "Ingest", unit: "events/s", rate: "events_in"},
    {key: "deliveries", title: "Deliveries", unit: "deliveries/s", rate: "deliveries"},
    {key: "flush", title: "Batch flush time", unit: "ms", value: function (s, p) {
      if (!p || s.flushes === p.flushes) return 0;
      return 1000 * (s.flush_seconds - p.flush_seconds) / (s.flushes - p.flushes);
    }},
    {key: "pool", title: "Database pool in use", unit: "connections",
     value: function (s) { return s.pool_in_use; },
     suffix: function (s) { return " / " + s.pool_size; }},
    {key: "backlog", title: "Ingest backlog", unit: "events", value: function (s) { return s.backlog; }},
  ];
  var series = {};
  var previous = null;
  var previousStreams = {};
  var stats = null;
  var tail = null;
  var $ = function (id) { return document.getElementById(id); };
  var SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    var el = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function build() {
    var root = $("charts");
    CHARTS.forEach(function (c) {
      series[c.key] = [];
      var card = document.createElement("div");
      card.className = "card";
      card.id = "chart-" + c.key;
      card.innerHTML = '<h2></h2><div class="value">–</div>';
      card.querySelector("h2").textContent = c.title + " (" + c.unit + ")";
      var chart = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
                              "aria-label": c.title + " over the last minute, in " + c.unit});
      var bottom = H - BOTTOM, right = W - RIGHT, mid = (TOP + bottom) / 2;
      chart.appendChild(svg("line", {"class": "grid", x1: LEFT, x2: right, y1: TOP, y2: TOP}));
      chart.appendChild(svg("line", {"class": "grid", x1: LEFT, x2: right, y1: mid, y2: mid}));
      chart.appendChild(svg("line", {"class": "axis", x1: LEFT, x2: LEFT, y1: TOP, y2: bottom}));
      chart.appendChild(svg("line", {"class": "axis", x1: LEFT, x2: right, y1: bottom, y2: bottom}));
      chart.appendChild(svg("text", {"class": "y-max", x: LEFT - 4, y: TOP + 4, "text-anchor": "end"}, "1"));
      chart.appendChild(svg("text", {"class": "y-mid", x: LEFT - 4, y: mid + 4, "text-anchor": "end"}, "0.5"));
      chart.appendChild(svg("text", {"class": "y-min", x: LEFT - 4, y: bottom + 3, "text-anchor": "end"}, "0"));
      chart.appendChild(svg("text", {"class": "x-label", x: LEFT, y: H - 4}, "60 s ago"));
      chart.appendChild(svg("text", {"class": "x-label", x: (LEFT + right) / 2, y: H - 4, "text-anchor": "middle"}, "30 s"));
      chart.appendChild(svg("text", {"class": "x-label", x: right, y: H - 4, "text-anchor": "end"}, "now"));
      chart.appendChild(svg("polyline", {points: ""}));
      card.appendChild(chart);
      root.appendChild(card);
    });
  }

  function format(n) {
    if (n >= 100) return Math.round(n).toLocaleString();
    return (Math.round(n * 10) / 10).toString();
  }

  function niceMax(max) {  // 1, 2 or 5 times a power of ten, at or above max
    if (max <= 1) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(max)));
    return [1, 2, 5, 10].map(function (m) { return m * p; }).filter(function (v) { return v >= max; })[0];
  }

  function draw(c, s) {
    var data = series[c.key];
    var top = niceMax(Math.max.apply(null, data.concat([0])));
    var bottom = H - BOTTOM, right = W - RIGHT;
    var x0 = right - (data.length - 1) * (right - LEFT) / (POINTS - 1);  // newest at "now"
    var points = data.map(function (v, i) {
      var x = x0 + i * (right - LEFT) / (POINTS - 1);
      return x.toFixed(1) + "," + (bottom - (bottom - TOP) * v / top).toFixed(1);
    }).join(" ");
    var card = $("chart-" + c.key);
    card.querySelector("polyline").setAttribute("points", points);
    card.querySelector(".y-max").textContent = format(top);
    card.querySelector(".y-mid").textContent = format(top / 2);
    var last = data.length ? data[data.length - 1] : 0;
    card.querySelector(".value").textContent = format(last) + (c.suffix ? c.suffix(s) : "") + " " + c.unit;
    card.dataset.samples = String(data.length);
    card.dataset.last = String(last);
    card.dataset.axisMax = String(top);
  }

  function duration(seconds) {
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) return (Math.round(seconds / 360) / 10) + " h";
    return (Math.round(seconds / 8640) / 10) + " d";
  }

  function retention(r) {
    if (!r) return "–";
    var age = r.maxAgeS ? duration(r.maxAgeS) : "forever";
    return r.maxEvents ? age + ", at most " + r.maxEvents.toLocaleString() + " events" : age;
  }

  function cells(row, values) {
    values.forEach(function (v) {
      var td = document.createElement("td");
      if (typeof v === "object") { td.className = v.cls; td.textContent = v.text; } else td.textContent = v;
      row.appendChild(td);
    });
  }

  function streamsTable(s, dt) {
    var body = $("streams").querySelector("tbody");
    body.innerHTML = "";
    var seen = {};
    (s.streams || []).forEach(function (st) {
      var before = previousStreams[st.name];
      var rate = before !== undefined ? Math.max(0, (st.events - before) / dt) : 0;
      seen[st.name] = st.events;
      var tr = document.createElement("tr");
      tr.dataset.stream = st.name;
      cells(tr, [st.name === ".mercure" ? ".mercure (Mercure updates)" : st.name,
                 {cls: "num", text: String(st.subscribers)}, {cls: "num", text: format(rate)},
                 st.lastId ? "#" + st.lastId + " · " + duration(Math.max(0, s.time - st.lastAt)) + " ago" : "–",
                 retention(st.retention)]);
      body.appendChild(tr);
    });
    previousStreams = seen;
    if (!body.children.length) {
      var tr = document.createElement("tr");
      tr.innerHTML = '<td class="empty" colspan="5">no activity yet</td>';
      body.appendChild(tr);
    }
  }

  function processesTable(s) {
    var body = $("processes").querySelector("tbody");
    body.innerHTML = "";
    (s.process_list || []).forEach(function (p) {
      var tr = document.createElement("tr");
      cells(tr, [p.host + " · " + p.pid, {cls: "num", text: String(p.connections)},
                 {cls: "num", text: duration(p.uptime_s)},
                 {cls: "num", text: p.heartbeat_age_s.toFixed(1) + " s ago"}]);
      body.appendChild(tr);
    });
  }

  function onStats(s) {
    if (s.scope === "streams") {  // not an operator token: only the streams it may subscribe to
      streamsTable(s, previous ? Math.max(0.001, s.time - previous.time) : 1);
      previous = s;
      $("status").textContent = "live · the streams this token may subscribe to (fleet numbers need an operator token)";
      $("status").className = "live";
      return;
    }
    var dt = previous ? Math.max(0.001, s.time - previous.time) : 1;
    CHARTS.forEach(function (c) {
      var v = c.rate ? (previous ? Math.max(0, (s[c.rate] - previous[c.rate]) / dt) : 0)
                     : c.value(s, previous);
      series[c.key].push(v);
      if (series[c.key].length > POINTS) series[c.key].shift();
      draw(c, s);
    });
    streamsTable(s, dt);
    processesTable(s);
    previous = s;
    $("status").textContent = "live · " + s.processes + " process" + (s.processes === 1 ? "" : "es");
    $("status").className = "live";
  }

  function grants(token) {  // what the token says it may publish (the server decides)
    try {
      var payload = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
      var publish = payload.publish || [];
      return publish.length ? "this token may publish to: " + publish.join(", ")
                            : "this token may not publish";
    } catch (e) { return ""; }
  }

  function publish(event) {
    event.preventDefault();
    var token = $("token").value.trim();
    var result = $("publish-result");
    result.className = "";
    var data;
    try { data = JSON.parse($("publish-data").value); } catch (e) {
      result.textContent = "data must be JSON"; result.className = "error"; return;
    }
    result.textContent = "publishing…";
    fetch("/api/v1/events", {
      method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({stream: $("publish-stream").value.trim(),
                            type: $("publish-type").value.trim() || "message", data: data}),
    }).then(function (r) {
      return r.json().then(function (body) {
        if (r.ok) {
          result.textContent = "published #" + body.events[0].id;
          result.className = "ok";
        } else {
          result.textContent = r.status + " " + (body.detail || body.title);
          result.className = "error";
        }
      });
    }).catch(function (e) { result.textContent = String(e); result.className = "error"; });
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
  $("publish-form").addEventListener("submit", publish);
  $("publish-grants").textContent = grants($("token").value);
  $("token").addEventListener("change", function () { $("publish-grants").textContent = grants($("token").value); });
  if ($("token").value) connect();
})();
