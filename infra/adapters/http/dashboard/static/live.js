// The dashboard's live updates and the task page's replay scrubber.
//
// Progressive enhancement over server-rendered pages: without this script every page
// works with links, forms and full loads. With it:
//
// * one EventSource on /ui/stream per page (server-sent events pushed by the live
//   projection; no polling). On an event the page's live fragments, the elements
//   [data-live="<name>"], are fetched again (?fragment=<name> on the page's own URL,
//   which answers with the element's inner HTML) and swapped in, debounced (~100 ms),
//   one fetch per fragment in flight;
// * #live[data-state] says "connecting", "connected" or "reconnecting";
// * the stream resumes where the page is: the meta ccc-last-seq (the log position the
//   page was rendered at) on the first connection, then the last event id (the browser
//   sends it as Last-Event-ID). The server answers "resync" when the page missed
//   anything (the API restarted, the network dropped): one refetch catches up. If the
//   browser gives up on the stream (an HTTP error, not a dropped connection), this
//   script reconnects itself with a capped, jittered backoff;
// * input#scrubber (task page): moving it fetches ?fragment=replay&seq=N into #replay,
//   throttled, the newest position winning.
//
// No inline handlers, no eval, nothing from another origin: the pages' Content-Security-
// Policy is default-src 'self'. Every failure is handled here (no console errors): a
// failed fetch keeps what is shown, the next event tries again.
(function () {
  "use strict";

  const STREAM = "/ui/stream";
  const DEBOUNCE_MS = 100; // events closer than this share one refetch
  const MIN_GAP_MS = 250; // and refetches start at most this often (the API's rate limit)
  const SCRUB_MS = 60; // the scrubber fetches at most this often while dragged
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;

  let source = null;
  let lastSeq = null; // the newest log position this page has heard of
  let failures = 0;
  let reconnectTimer = null;

  // -- small helpers --------------------------------------------------------------------------
  function metaSeq() {
    const meta = document.querySelector('meta[name="ccc-last-seq"]');
    const n = meta ? parseInt(meta.getAttribute("content"), 10) : NaN;
    return Number.isFinite(n) && n >= 0 ? n : null;
  }

  function showSeq(seq) {
    // the log position the page now reflects (lower only after a resync to a log that
    // is not the one the page came from)
    const meta = document.querySelector('meta[name="ccc-last-seq"]');
    if (meta && seq !== null) meta.setAttribute("content", String(seq));
  }

  function setState(state) {
    const el = document.getElementById("live");
    if (!el || el.dataset.state === state) return;
    el.dataset.state = state;
    el.title = {
      connecting: "connecting to the live event log…",
      connected: "live: updates as the event log grows",
      reconnecting: "reconnecting to the live event log…",
    }[state] || state;
  }

  function liveNames() {
    const names = [];
    for (const el of document.querySelectorAll("[data-live]")) {
      const name = el.dataset.live;
      if (name && !names.includes(name)) names.push(name);
    }
    return names;
  }

  function fragmentUrl(name, extra) {
    const url = new URL(window.location.href);
    url.hash = "";
    url.searchParams.set("fragment", name);
    for (const [k, v] of Object.entries(extra || {})) url.searchParams.set(k, String(v));
    return url;
  }

  async function fetchFragment(name, extra) {
    let response;
    try {
      response = await fetch(fragmentUrl(name, extra), {
        headers: { Accept: "text/html" },
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (e) {
      return null; // offline: keep what is shown
    }
    if (!response.ok || response.redirected) return null; // (redirected: to the sign-in page)
    const seq = parseInt(response.headers.get("X-Ccc-Last-Seq") || "", 10);
    try {
      return { html: await response.text(), seq: Number.isFinite(seq) ? seq : null };
    } catch (e) {
      return null;
    }
  }

  function parse(html) {
    const template = document.createElement("template");
    template.innerHTML = html; // inert: scripts do not run, and the server escaped it
    return template.content;
  }

  // The fragment's content: the element's inner HTML (what the pages send), or, if a
  // server sends the element itself, its children.
  function contentOf(html, match) {
    const content = parse(html);
    const roots = Array.from(content.children);
    if (roots.length === 1 && match(roots[0]) && content.textContent.trim() === roots[0].textContent.trim()) {
      const inner = document.createDocumentFragment();
      inner.append(...roots[0].childNodes);
      return inner;
    }
    return content;
  }

  // -- swapping without losing the reader's place ------------------------------------------------
  function keyOf(el) {
    if (el.id) return "#" + el.id;
    if (el.matches("section.column[data-state]")) return "column:" + el.dataset.state;
    return null;
  }

  function remember(root) {
    const kept = { scroll: new Map(), open: new Map(), focus: null };
    for (const el of root.querySelectorAll("[id], section.column[data-state]")) {
      const key = keyOf(el);
      if (!key) continue;
      if (el.scrollTop || el.scrollLeft) kept.scroll.set(key, [el.scrollTop, el.scrollLeft]);
      if (el.tagName === "DETAILS") kept.open.set(key, el.open);
    }
    const active = document.activeElement;
    if (active && active !== document.body && root.contains(active) && active.id) {
      kept.focus = { id: active.id, value: "value" in active ? active.value : null };
    }
    return kept;
  }

  function restore(root, kept) {
    for (const el of root.querySelectorAll("[id], section.column[data-state]")) {
      const key = keyOf(el);
      if (!key) continue;
      const scroll = kept.scroll.get(key);
      if (scroll) [el.scrollTop, el.scrollLeft] = scroll;
      if (kept.open.has(key)) el.open = kept.open.get(key);
    }
    if (kept.focus) {
      const el = document.getElementById(kept.focus.id);
      if (el && root.contains(el)) {
        if (kept.focus.value !== null && "value" in el) el.value = kept.focus.value;
        el.focus({ preventScroll: true });
      }
    }
  }

  function swap(target, content) {
    const kept = remember(target);
    target.replaceChildren(content);
    restore(target, kept);
  }

  // -- live fragments -------------------------------------------------------------------------------
  const refresh = { timer: null, busy: false, dirty: false, lastStart: 0, retries: 0 };

  function requestRefresh() {
    refresh.dirty = true;
    if (refresh.timer !== null || refresh.busy) return;
    if (document.hidden) return; // done when the page is shown again
    const wait = Math.max(DEBOUNCE_MS, refresh.lastStart + MIN_GAP_MS - performance.now());
    refresh.timer = setTimeout(runRefresh, wait);
  }

  async function runRefresh() {
    refresh.timer = null;
    if (!refresh.dirty) return;
    refresh.dirty = false;
    refresh.busy = true;
    refresh.lastStart = performance.now();
    const wanted = lastSeq;
    try {
      const names = liveNames();
      const results = await Promise.all(names.map((name) => fetchFragment(name)));
      let shown = null;
      names.forEach((name, i) => {
        const result = results[i];
        if (!result) return;
        for (const el of document.querySelectorAll(`[data-live="${CSS.escape(name)}"]`)) {
          swap(el, contentOf(result.html, (root) => root.dataset.live === name));
        }
        if (result.seq !== null) shown = shown === null ? result.seq : Math.min(shown, result.seq);
        if (name === "task") afterTaskSwap();
      });
      if (results.every(Boolean)) {
        refresh.retries = 0;
        showSeq(shown !== null ? Math.max(shown, wanted || 0) : wanted);
        document.dispatchEvent(new CustomEvent("ccc:refreshed", { detail: { seq: wanted } }));
      } else if (refresh.retries < 3 && source !== null && source.readyState === EventSource.OPEN) {
        // a fetch failed while the stream is up (a blip, a 429): try again a little later
        refresh.retries += 1;
        refresh.lastStart = performance.now() + 1000 * refresh.retries;
        refresh.dirty = true;
      }
    } catch (e) {
      // a bug in a swap must not end live updates; the next event tries again
    } finally {
      refresh.busy = false;
      if (refresh.dirty) requestRefresh();
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && refresh.dirty) requestRefresh();
  });

  // -- which events matter to this page ----------------------------------------------------------------
  function pageTask() {
    const el = document.querySelector('[data-live="task"][data-task], #scrubber[data-task]');
    if (el) return el.dataset.task;
    const m = /^\/tasks\/([^/]+)$/.exec(window.location.pathname);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function pageAgent() {
    const m = /^\/agents\/([^/]+)$/.exec(window.location.pathname);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function matters(type, change) {
    if (type === "resync") return true;
    const page = document.body ? document.body.dataset.page : "";
    if (page === "task") return change.id === pageTask();
    if (page === "agent") return change.kind !== "agent" || change.id === pageAgent();
    if (page === "board") return change.kind === "task";
    return true;
  }

  // -- the stream ---------------------------------------------------------------------------------------
  function onEvent(event) {
    const seq = parseInt(event.lastEventId, 10);
    if (Number.isFinite(seq)) lastSeq = seq;
    let change = {};
    try {
      change = JSON.parse(event.data);
    } catch (e) {
      change = {};
    }
    if (matters(event.type, change)) requestRefresh();
    else if (!refresh.dirty && !refresh.busy && refresh.timer === null) showSeq(lastSeq); // as new as the log
  }

  function connect() {
    reconnectTimer = null;
    const url = new URL(STREAM, window.location.origin);
    if (lastSeq !== null) url.searchParams.set("since", String(lastSeq));
    const es = new EventSource(url);
    source = es;
    es.addEventListener("open", () => {
      if (source !== es) return;
      failures = 0;
      setState("connected");
    });
    es.addEventListener("change", onEvent);
    es.addEventListener("resync", onEvent);
    es.addEventListener("error", () => {
      if (source !== es) return;
      setState("reconnecting");
      if (es.readyState === EventSource.CLOSED) {
        // the browser gave up (an HTTP error, e.g. while the API restarts behind a
        // proxy): come back ourselves, from the last position heard
        es.close();
        source = null;
        scheduleReconnect();
      }
      // else: the browser reconnects by itself after the server's retry delay,
      // sending Last-Event-ID
    });
  }

  function scheduleReconnect() {
    if (reconnectTimer !== null) return;
    failures += 1;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(failures - 1, 10));
    const delay = base * (0.8 + Math.random() * 0.4);
    reconnectTimer = setTimeout(connect, delay);
  }

  window.addEventListener("pagehide", () => {
    // leaving (or into the back/forward cache): close the stream cleanly
    if (source) source.close();
    source = null;
    if (reconnectTimer !== null) clearTimeout(reconnectTimer);
    reconnectTimer = null;
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && source === null) {
      setState("reconnecting");
      connect(); // from lastSeq: the server says resync if anything happened meanwhile
    }
  });

  // -- the replay scrubber -------------------------------------------------------------------------------
  const scrub = { wanted: null, busy: false, lastAt: 0, inflight: null, shown: null };

  function scrubber() {
    return document.getElementById("scrubber");
  }

  function following(input) {
    // at the last event: the replay follows new events; moved back: it stays put
    return input.dataset.following !== "false";
  }

  function showScrubValue(input) {
    for (const out of document.querySelectorAll("output[for~='scrubber']")) out.value = input.value;
    input.setAttribute("aria-valuetext", "after sequence " + input.value);
  }

  function onScrub(event) {
    const input = event.target;
    if (!(input instanceof HTMLInputElement) || input.id !== "scrubber") return;
    input.dataset.following = String(Number(input.value) >= Number(input.max));
    showScrubValue(input);
    requestReplay(input.value);
  }

  function requestReplay(seq) {
    seq = String(seq);
    if (scrub.busy ? seq === scrub.inflight && scrub.wanted === null : seq === scrub.shown) return;
    scrub.wanted = seq; // (input and change both fire for one move: one fetch)
    if (!scrub.busy) runReplay();
  }

  async function runReplay() {
    scrub.busy = true;
    try {
      while (scrub.wanted !== null) {
        const wait = scrub.lastAt + SCRUB_MS - performance.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        const seq = scrub.wanted;
        scrub.wanted = null;
        scrub.inflight = seq;
        scrub.lastAt = performance.now();
        // one fetch at a time, each answer shown as it comes (a drag shows the states it
        // passes), the newest position last
        const result = await fetchFragment("replay", { seq });
        const target = document.getElementById("replay");
        if (result && target) {
          swap(target, contentOf(result.html, (root) => root.id === "replay"));
          scrub.shown = seq;
        }
      }
    } catch (e) {
      // keep the last replay shown
    } finally {
      scrub.busy = false;
      scrub.inflight = null;
    }
  }

  // After the task's header and timeline were swapped: the scrubber spans the task's
  // events again, and, if it was at the last one, moves to the new last one.
  function afterTaskSwap() {
    const input = scrubber();
    const timeline = document.getElementById("timeline");
    if (!input || !timeline) return;
    const first = parseInt(timeline.dataset.firstSeq, 10);
    const last = parseInt(timeline.dataset.lastSeq, 10);
    if (!Number.isFinite(first) || !Number.isFinite(last) || String(last) === input.max) return;
    const follow = following(input);
    input.min = String(first);
    input.max = String(last);
    const stops = input.list;
    if (stops) {
      const have = new Set(Array.from(stops.options, (o) => o.value));
      for (const li of timeline.querySelectorAll("li.event[data-seq]")) {
        if (!have.has(li.dataset.seq)) {
          const option = document.createElement("option");
          option.value = li.dataset.seq;
          stops.append(option);
        }
      }
    }
    if (follow) {
      input.value = String(last);
      showScrubValue(input);
      requestReplay(last);
    }
  }

  document.addEventListener("input", onScrub);
  document.addEventListener("change", onScrub);

  // -- start ----------------------------------------------------------------------------------------------
  function start() {
    lastSeq = metaSeq();
    const input = scrubber();
    if (input) input.dataset.following = String(Number(input.value) >= Number(input.max));
    if (typeof EventSource !== "function") return; // the pages work without live updates
    setState("connecting");
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
