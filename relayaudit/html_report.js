// relayaudit report: client-side filters and finding links. The page reads fine without this.
"use strict";
(function () {
  const form = document.getElementById("filters");
  const list = document.getElementById("list");
  if (!form || !list) return;
  const items = Array.from(list.querySelectorAll(":scope > details.f"));
  const kind = document.getElementById("f-kind");
  const sev = document.getElementById("f-sev");
  const status = document.getElementById("f-status");
  const net = document.getElementById("f-net");
  const owner = document.getElementById("f-owner");
  const text = document.getElementById("f-text");
  const shown = document.getElementById("shown");
  const none = document.getElementById("none");
  // what each finding is filtered on, read once: the filter loop touches no attribute
  const keys = items.map(function (el) {
    const d = el.dataset;
    return { el: el, kind: d.kind, sev: d.sev, status: d.status, nets: " " + d.nets + " ", owner: d.owner, text: d.text };
  });

  function statusOk(value, wanted) {
    if (wanted === "all") return true;
    if (wanted === "open") return value !== "resolved";
    return value === wanted;
  }

  function apply() {
    const k = kind.value, s = sev.value, st = status.value, n = net.value, o = owner.value;
    const q = text.value.trim().toLowerCase();
    const nt = " " + n + " ";
    let count = 0;
    for (const it of keys) {
      const ok = (!k || it.kind === k) && (!s || it.sev === s) && statusOk(it.status, st) &&
        (!n || it.nets.includes(nt)) && (!o || it.owner === o) && (!q || it.text.includes(q));
      if (it.el.hidden === ok) it.el.hidden = !ok;
      if (ok) count++;
    }
    shown.value = count + " of " + keys.length + " findings shown";
    none.hidden = count > 0;
  }

  function reset(wanted) {
    kind.value = ""; sev.value = ""; status.value = wanted; net.value = ""; owner.value = "";
    text.value = "";
  }

  // a link to #ra-… opens that finding, clearing the filters if they hide it
  function follow() {
    const id = decodeURIComponent(location.hash.slice(1));
    if (!/^ra-[0-9a-f]{16}$/.test(id)) return;
    const el = document.getElementById(id);
    if (!el || !el.classList.contains("f")) return;
    if (el.hidden) { reset("all"); apply(); }
    el.open = true;
    el.scrollIntoView({ block: "start" });
    el.querySelector("summary").focus({ preventScroll: true });
  }

  form.addEventListener("input", apply);
  form.addEventListener("change", apply);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  form.addEventListener("reset", function (e) { e.preventDefault(); reset("open"); apply(); });
  for (const b of document.querySelectorAll("button[data-owner]")) {
    b.addEventListener("click", function () {
      owner.value = b.dataset.owner;
      if (status.value !== "all") status.value = "open";
      apply();
      document.getElementById("findings").scrollIntoView({ block: "start" });
    });
  }
  for (const b of document.querySelectorAll("button[data-net]")) {
    b.addEventListener("click", function () {
      net.value = b.dataset.net;
      if (status.value !== "all") status.value = "open";
      apply();
      document.getElementById("findings").scrollIntoView({ block: "start" });
    });
  }
  window.addEventListener("hashchange", follow);
  form.hidden = false;
  apply();
  follow();
})();
