// cn_clip search page: plain JS, no build step. State lives in the URL (?q=…, ?similar=…, &page=, &lang=),
// so a search can be shared by copying the address.
"use strict";

const PAGE_SIZE = 20;
const TEXT = {
  zh: {
    title: "图片搜索", placeholder: "输入描述，例如：红色连衣裙", search: "搜索", upload: "上传图片",
    drop: "也可以把图片拖到这里，以图搜图", prev: "上一页", next: "下一页", page: (n) => `第 ${n} 页`,
    loading: "搜索中…", empty: "没有找到结果，换个说法试试。", idle: "输入文字或上传图片开始搜索。",
    error: (m) => `出错了：${m}`, similar: "相似图片", resultsText: (q, n) => `“${q}”的搜索结果，共 ${n} 张图片中`,
    resultsImage: (n) => `以图搜图的结果，共 ${n} 张图片中`, resultsSimilar: (id) => `与 ${id} 相似的图片`,
    info: (i) => `${i.count} 张图片 · ${i.architecture} · 索引 ${i.index_type}`, notImage: "请上传图片文件。",
    lang: "English", score: "相似度", probability: "匹配概率",
  },
  en: {
    title: "Image search", placeholder: "Describe what you are looking for, e.g. 红色连衣裙", search: "Search",
    upload: "Upload image", drop: "…or drop an image here to search by image", prev: "Previous", next: "Next",
    page: (n) => `Page ${n}`, loading: "Searching…", empty: "No results. Try other words.",
    idle: "Type a description or upload an image to start.", error: (m) => `Something went wrong: ${m}`,
    similar: "Similar images", resultsText: (q, n) => `Results for “${q}” among ${n} images`,
    resultsImage: (n) => `Results for your image among ${n} images`, resultsSimilar: (id) => `Images similar to ${id}`,
    info: (i) => `${i.count} images · ${i.architecture} · ${i.index_type} index`, notImage: "Please choose an image file.",
    lang: "中文", score: "score", probability: "match probability",
  },
};

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let lang = params.get("lang") || localStorage.getItem("cn_clip.lang") || "zh";
if (!TEXT[lang]) lang = "zh";
let uploaded = null; // the File of the last image search (not in the URL)
let current = null; // {kind: "text"|"image"|"similar", value, page}
let info = null;

const t = (key, ...args) => {
  const value = TEXT[lang][key];
  return typeof value === "function" ? value(...args) : value;
};

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.title = `cn_clip · ${t("title")}`;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
  if (info) $("info").textContent = t("info", info);
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = kind || "";
}

function pushUrl(state) {
  const next = new URLSearchParams();
  if (state.kind === "text") next.set("q", state.value);
  if (state.kind === "similar") next.set("similar", state.value);
  if (state.page > 1) next.set("page", String(state.page));
  if (lang !== "zh") next.set("lang", lang);
  const url = next.toString() ? `?${next}` : location.pathname;
  history.pushState(state.kind === "image" ? null : state, "", url);
}

async function readError(response) {
  try {
    const body = await response.json();
    return body.detail || `${response.status}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function run(state, push = true) {
  current = state;
  if (push) pushUrl(state);
  const offset = (state.page - 1) * PAGE_SIZE;
  const query = `k=${PAGE_SIZE}&offset=${offset}`;
  $("grid").replaceChildren();
  $("pager").hidden = true;
  setStatus(t("loading"), "loading");
  let response;
  try {
    if (state.kind === "text") {
      response = await fetch(`/api/search?q=${encodeURIComponent(state.value)}&${query}`);
    } else if (state.kind === "similar") {
      const path = String(state.value).split("/").map(encodeURIComponent).join("/");
      response = await fetch(`/api/similar/${path}?${query}`);
    } else {
      const form = new FormData();
      form.append("image", state.value);
      response = await fetch(`/api/search?${query}`, { method: "POST", body: form });
    }
  } catch (err) {
    setStatus(t("error", err.message), "error");
    return;
  }
  if (state !== current) return; // a newer search started meanwhile
  if (!response.ok) {
    setStatus(t("error", await readError(response)), "error");
    return;
  }
  render(state, await response.json());
}

function render(state, body) {
  if (!body.results.length) {
    setStatus(t("empty"), "empty");
    return;
  }
  const heading = state.kind === "text" ? t("resultsText", state.value, body.total)
    : state.kind === "similar" ? t("resultsSimilar", state.value) : t("resultsImage", body.total);
  setStatus(heading, "done");
  const cards = body.results.map((hit) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "hit";
    card.title = `${t("similar")}: ${hit.id}`;
    card.dataset.id = String(hit.id);
    const img = document.createElement("img");
    img.src = `${hit.image_url}?size=256`;
    img.alt = String(hit.id);
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = `#${hit.rank} ${hit.id}`;
    const score = document.createElement("span");
    score.className = "score";
    score.title = hit.probability === undefined ? t("score") : t("probability");
    score.textContent = hit.probability === undefined ? hit.score.toFixed(3) : `${(100 * hit.probability).toFixed(1)}%`;
    meta.append(id, score);
    card.append(img, meta);
    card.addEventListener("click", () => run({ kind: "similar", value: String(hit.id), page: 1 }));
    return card;
  });
  $("grid").replaceChildren(...cards);
  $("pager").hidden = state.page === 1 && !body.has_more;
  $("prev").disabled = state.page === 1;
  $("next").disabled = !body.has_more;
  $("page-no").textContent = t("page", state.page);
}

function searchFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus(t("notImage"), "error");
    return;
  }
  uploaded = file;
  run({ kind: "image", value: file, page: 1 });
}

function fromUrl() {
  const p = new URLSearchParams(location.search);
  const page = Math.max(1, parseInt(p.get("page") || "1", 10) || 1);
  if (p.get("q")) {
    $("q").value = p.get("q");
    run({ kind: "text", value: p.get("q"), page }, false);
  } else if (p.get("similar")) {
    run({ kind: "similar", value: p.get("similar"), page }, false);
  } else {
    current = null;
    $("grid").replaceChildren();
    $("pager").hidden = true;
    setStatus(t("idle"), "idle");
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (q) run({ kind: "text", value: q, page: 1 });
});
$("upload").addEventListener("change", (event) => {
  searchFile(event.target.files[0]);
  event.target.value = "";
});
const drop = $("drop");
["dragenter", "dragover"].forEach((name) => document.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => document.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.remove("over");
}));
document.addEventListener("drop", (event) => searchFile(event.dataTransfer.files[0]));
$("prev").addEventListener("click", () => run({ ...current, page: current.page - 1 }));
$("next").addEventListener("click", () => run({ ...current, page: current.page + 1 }));
$("lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("cn_clip.lang", lang);
  applyLanguage();
  if (current && current.kind !== "image") pushUrl(current);
  if (current) run(current, false); else fromUrl();
});
window.addEventListener("popstate", fromUrl);

applyLanguage();
fetch("/api/info").then((r) => (r.ok ? r.json() : null)).then((body) => {
  info = body;
  if (info) $("info").textContent = t("info", info);
}).catch(() => {});
fromUrl();
