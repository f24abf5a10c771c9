/* Sluice browser client: live events over EventSource, with long-poll XHR as the fallback.
 *
 *   const sub = Sluice.subscribe({
 *     streams: ["room/1"],          // required
 *     url: "",                      // Sluice's base URL; "" = this page's origin
 *     token: "...",                 // or a function returning one (asked at every connect);
 *                                   // omit to rely on the sluice_token cookie or origin auth
 *     withCredentials: false,       // send cookies cross-origin (needs CORS_ORIGINS on Sluice)
 *     lastEventId: null,            // resume after this id (e.g. one saved earlier)
 *     transport: "auto",            // "auto" | "sse" | "poll"
 *     fallbackAfter: 2,             // SSE attempts held back on the way before polling
 *     openTimeoutMs: 8000,          // how long an SSE connection may take to say hello
 *     onEvent: (e) => {},           // every event: {id, type, data, stream?}
 *     onStatus: (s) => {},          // "connecting" | "open" | "polling" | "ended" | "closed"
 *     onError: (problem) => {},     // refused for good (401/403/404...): the problem body
 *     onReset: (notice) => {},      // history after the resume point is gone (retention, or
 *                                   // the stream was re-created): {reason, streams, oldest};
 *                                   // what is still held follows
 *   });
 *   sub.on("chat", (e) => {});      // events of one type (any type, in both transports)
 *   sub.lastEventId;                // where it would resume from
 *   sub.transport;                  // "sse" or "poll", as it is now
 *   sub.close();
 *
 * Both transports resume from the last id they saw, across reconnects, server restarts and the
 * switch from SSE to long-poll, so no event is missed or repeated. Refusals (the server answers
 * 4xx before any byte) stop the subscription and reach onError; everything else is retried.
 */
(function (root) {
  "use strict";

  var POLL_TIMEOUT_S = 25;
  var BACKOFF_FIRST_MS = 1000;
  var BACKOFF_MAX_MS = 30000;

  function Subscription(options) {
    if (!options || !options.streams || !options.streams.length) {
      throw new Error("Sluice.subscribe needs streams");
    }
    this.options = options;
    this.base = (options.url || "").replace(/\/$/, "");
    this.lastEventId = options.lastEventId || null;
    this.sid = null;
    this.transport = null;
    this.closed = false;
    this.handlers = {};
    this.failures = 0;
    this.backoffMs = BACKOFF_FIRST_MS;
    this.es = null;
    this.xhr = null;
    this.timer = null;
    this.helloTimer = null;
    var wanted = options.transport || "auto";
    if (wanted === "poll" || (wanted === "auto" && typeof root.EventSource === "undefined")) {
      this._poll();
    } else {
      this._sse();
    }
  }

  Subscription.prototype.on = function (type, handler) {
    (this.handlers[type] = this.handlers[type] || []).push(handler);
    return this;
  };

  Subscription.prototype.close = function () {
    this.closed = true;
    this._stop();
    this._status("closed");
  };

  // -- plumbing ------------------------------------------------------------------------------
  Subscription.prototype._status = function (status) {
    if (this.options.onStatus) this.options.onStatus(status);
  };

  Subscription.prototype._stop = function () {
    this._clearHelloTimer();
    if (this.es) { this.es.close(); this.es = null; }
    if (this.xhr) { this.xhr.abort(); this.xhr = null; }
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
  };

  Subscription.prototype._later = function (fn, ms) {
    var self = this;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(function () { self.timer = null; if (!self.closed) fn.call(self); }, ms);
  };

  Subscription.prototype._backoff = function () {
    var ms = this.backoffMs * (0.5 + Math.random() / 2);
    this.backoffMs = Math.min(BACKOFF_MAX_MS, this.backoffMs * 2);
    return ms;
  };

  Subscription.prototype._token = function () {
    var t = this.options.token;
    return typeof t === "function" ? t() : t;
  };

  Subscription.prototype._query = function (extra) {
    var parts = this.options.streams.map(function (s) { return "stream=" + encodeURIComponent(s); });
    var token = this._token();
    if (token) parts.push("token=" + encodeURIComponent(token));
    for (var k in extra) {
      if (extra[k] !== null && extra[k] !== undefined) parts.push(k + "=" + encodeURIComponent(extra[k]));
    }
    return parts.join("&");
  };

  Subscription.prototype._dispatch = function (event) {
    if (this.options.onEvent) this.options.onEvent(event);
    var list = this.handlers[event.type] || [];
    for (var i = 0; i < list.length; i++) list[i](event);
  };

  Subscription.prototype._reset = function (notice) {
    if (this.options.onReset) this.options.onReset(notice);
  };

  Subscription.prototype._refused = function (status, body) {
    var problem = body;
    try { problem = JSON.parse(body); } catch (e) { problem = {status: status, detail: body}; }
    this.closed = true;
    this._stop();
    if (this.options.onError) this.options.onError(problem);
    this._status("closed");
  };

  // -- Server-Sent Events --------------------------------------------------------------------
  // SSE is asked for ?envelope=1: every event arrives as a `message` whose data is
  // {"type", "data"}, so one listener sees every type (EventSource has no wildcard listener).
  Subscription.prototype._listen = function (es) {
    var self = this;
    es.addEventListener("message", function (e) {
      if (es !== self.es) return;
      self.failures = 0;
      self.backoffMs = BACKOFF_FIRST_MS;
      self.lastEventId = e.lastEventId || self.lastEventId;
      var wrapped = JSON.parse(e.data);
      if (wrapped.reset) return self._reset(wrapped.reset);  // no id: the position stays
      var id = (e.lastEventId || "").split(".").pop();
      self._dispatch({id: id, type: wrapped.type, data: wrapped.data,
                      lastEventId: e.lastEventId});
    });
  };

  // Sluice sends `event: hello` first when asked (?hello=1): until it arrives, the stream is
  // not known to work. No hello within openTimeoutMs while the poll endpoint answers means
  // something between here and Sluice holds the stream back (a buffering proxy): after
  // fallbackAfter such failures the subscription switches to long-poll. An outage (nothing
  // answers) is not such a failure: it is retried over SSE.
  Subscription.prototype._sse = function () {
    var self = this;
    this._stop();
    this.transport = "sse";
    this._status("connecting");
    var url = this.base + "/api/v1/sse?" +
      this._query({lastEventId: this.lastEventId, hello: 1, envelope: 1});
    var es = this.es = new root.EventSource(url, {withCredentials: !!this.options.withCredentials});
    this._listen(es);
    es.addEventListener("hello", function () {
      if (es !== self.es) return;
      self._clearHelloTimer();
      self.failures = 0;
      self.backoffMs = BACKOFF_FIRST_MS;
      self._status("open");
    });
    es.addEventListener("end", function () {  // the stream was deleted
      if (es !== self.es) return;
      self.closed = true;
      self._stop();
      self._status("ended");
    });
    es.onerror = function () {
      if (es !== self.es) return;
      if (es.readyState === 2) return self._sseStopped();  // the browser gave up on it
      self._status("connecting");  // the browser reconnects with Last-Event-ID by itself
      self._startHelloTimer(es);
    };
    this._startHelloTimer(es);
  };

  Subscription.prototype._clearHelloTimer = function () {
    if (this.helloTimer) { clearTimeout(this.helloTimer); this.helloTimer = null; }
  };

  Subscription.prototype._startHelloTimer = function (es) {
    var self = this;
    this._clearHelloTimer();
    this.helloTimer = setTimeout(function () {
      self.helloTimer = null;
      if (es === self.es) self._sseStopped();
    }, this.options.openTimeoutMs || 8000);
  };

  // The stream is not working: ask the poll endpoint (timeout=0) what is going on, since
  // EventSource hides the status. 4xx: refused for good. 200: Sluice answers, so the stream is
  // being held back on the way. Anything else: an outage; try SSE again later.
  Subscription.prototype._sseStopped = function () {
    var self = this;
    this._clearHelloTimer();
    if (this.es) { this.es.close(); this.es = null; }
    this._request(this.base + "/api/v1/poll?" + this._query({timeout: 0, cursor: this.lastEventId}),
      function (status, body) {
        if (self.closed) return;
        if (status >= 400 && status < 500 && status !== 429 && status !== 408) {
          return self._refused(status, body);
        }
        if (status === 200) {
          self.failures += 1;
          if ((self.options.transport || "auto") === "auto" &&
              self.failures >= (self.options.fallbackAfter || 2)) {
            return self._poll();
          }
        }
        self._later(self._sse, self._backoff());
      });
  };

  // -- long-poll -----------------------------------------------------------------------------
  Subscription.prototype._request = function (url, done) {
    var self = this;
    var xhr = this.xhr = new XMLHttpRequest();
    xhr.open("GET", url, true);
    xhr.withCredentials = !!this.options.withCredentials;
    xhr.timeout = (POLL_TIMEOUT_S + 10) * 1000;
    xhr.onload = function () {
      if (self.xhr === xhr) self.xhr = null;
      done(xhr.status, xhr.responseText, xhr);
    };
    xhr.onerror = xhr.ontimeout = function () {
      if (self.xhr === xhr) self.xhr = null;
      done(0, "", xhr);
    };
    xhr.send();
  };

  Subscription.prototype._poll = function () {
    var self = this;
    this._stop();
    if (this.transport !== "poll") this._status("polling");
    this.transport = "poll";
    var url = this.base + "/api/v1/poll?" +
      this._query({cursor: this.lastEventId, sid: this.sid, timeout: POLL_TIMEOUT_S});
    this._request(url, function (status, body, xhr) {
      if (self.closed) return;
      var wait = parseInt(xhr.getResponseHeader && xhr.getResponseHeader("Retry-After"), 10);
      if (status === 200) {
        var page = JSON.parse(body);
        self.sid = page.sid;
        if (page.reset) self._reset(page.reset);
        self.backoffMs = BACKOFF_FIRST_MS;
        for (var i = 0; i < page.events.length; i++) {
          var e = page.events[i];
          self.lastEventId = page.sid + "." + e.id;
          self._dispatch({id: e.id, type: e.type, data: e.data, stream: e.stream,
                          lastEventId: self.lastEventId});
        }
        self.lastEventId = page.sid + "." + page.cursor;
        return wait > 0 ? self._later(self._poll, wait * 1000) : self._poll();
      }
      if (status >= 400 && status < 500 && status !== 429 && status !== 408) {
        return self._refused(status, body);
      }
      self._later(self._poll, wait > 0 ? wait * 1000 : self._backoff());
    });
  };

  root.Sluice = {
    subscribe: function (options) { return new Subscription(options); },
    version: "1"
  };
})(typeof window !== "undefined" ? window : this);
