// The board, live: server-sent events from the server's events log bring changes within a second;
// actions post without leaving the page. Without script every page and form still works (plain links,
// forms that post and come back).
"use strict";

(function () {
  const body = document.body;
  const notice = document.getElementById("notice");
  const columns = document.getElementById("columns");
  const facts = document.getElementById("facts");
  const title = document.getElementById("run-title");
  const log = document.getElementById("log");
  const workspace = title ? title.dataset.workspace : null;

  function say(text) {
    if (notice) notice.textContent = text;
  }

  // Replace the cards of each column, keeping every card that did not change as it is (the same
  // element: an answer being typed, the focus and the scroll position survive a refresh).
  function mergeColumns(html) {
    const next = document.createElement("div");
    next.innerHTML = html;
    const focused = document.activeElement;
    const old = new Map();
    columns.querySelectorAll("article.card").forEach((c) => old.set(c.dataset.workspace, c));
    next.querySelectorAll("article.card").forEach((fresh) => {
      const kept = old.get(fresh.dataset.workspace);
      if (kept && kept.dataset.version === fresh.dataset.version) fresh.replaceWith(kept);
    });
    columns.replaceChildren(...next.childNodes);
    if (focused && focused !== document.body && document.contains(focused)) focused.focus();
  }

  // Replace a container's content; a button that had the focus hands it to its successor (the same
  // action, or the first one), and nothing is replaced under an answer being typed.
  function replaceKeepingFocus(container, html) {
    const focused = document.activeElement;
    const inside = focused && container.contains(focused) && focused !== container;
    if (inside && focused.tagName === "TEXTAREA" && focused.value) return;
    const form = inside ? focused.closest("form") : null;
    const action = form ? form.getAttribute("action") : null;
    container.innerHTML = html;
    if (!inside) return;
    const next =
      (action && container.querySelector('form[action="' + action + '"] button')) || container.querySelector("button, a");
    if (next) next.focus();
  }

  let pending = null;
  async function refresh() {
    pending = null;
    try {
      if (columns) {
        const r = await fetch("/columns" + location.search, { headers: { Accept: "application/json" } });
        if (!r.ok) return;
        const got = await r.json();
        mergeColumns(got.columns);
        const bar = document.getElementById("toolbar-wrap");
        if (bar) replaceKeepingFocus(bar, got.toolbar);
      }
      if (facts && workspace) {
        const r = await fetch("/run-facts/" + encodeURI(workspace), { headers: { Accept: "application/json" } });
        if (!r.ok) return;
        const got = await r.json();
        replaceKeepingFocus(facts, got.facts);
      }
    } catch (e) {
      /* the next change or the reconnect refreshes again */
    }
  }
  function soon() {
    if (pending === null) pending = setTimeout(refresh, 50);
  }

  if (body.dataset.cursor !== undefined) {
    const source = new EventSource("/events?cursor=" + encodeURIComponent(body.dataset.cursor));
    source.addEventListener("changes", (ev) => {
      const changes = JSON.parse(ev.data);
      if (!workspace || changes.some((c) => c.workspace === workspace)) soon();
    });
    source.addEventListener("ready", (ev) => {
      if (JSON.parse(ev.data).reset) soon();
    });
  }

  // Actions: post the form, say what the server answered, refresh.
  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("act") || form.action.endsWith("/signout")) return;
    ev.preventDefault();
    // Busy, not disabled: disabling the button would drop the keyboard focus to the page's start.
    if (form.dataset.busy) return;
    form.dataset.busy = "1";
    form.setAttribute("aria-busy", "true");
    try {
      const r = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { Accept: "application/json" },
      });
      const got = await r.json().catch(() => ({ message: r.statusText }));
      say(got.message || (r.ok ? "Done." : "That did not work."));
      if (r.ok) {
        const area = form.querySelector("textarea");
        if (area) area.value = "";
      }
    } catch (e) {
      say("The server could not be reached.");
    } finally {
      delete form.dataset.busy;
      form.removeAttribute("aria-busy");
      soon();
    }
  });

  // A run's log, live: what follows the last byte shown, once a second.
  if (log && workspace && log.dataset.end !== undefined) {
    let end = Number(log.dataset.end);
    setInterval(async () => {
      if (document.hidden) return;
      try {
        const r = await fetch("/run-log/" + encodeURI(workspace) + "?since=" + end, { headers: { Accept: "application/json" } });
        if (!r.ok) return;
        const got = await r.json();
        if (got.end > end && got.text) {
          const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
          log.append(got.text);
          if (atBottom) log.scrollTop = log.scrollHeight;
        }
        end = Math.max(end, got.end);
      } catch (e) {
        /* try again next second */
      }
    }, 1000);
  }
})();
