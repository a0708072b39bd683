// zoo's pages: filtering and sorting tables in the page, and the playground. Shipped with
// zoo; no framework, no network but this server.
"use strict";

function filterTable(input) {
  const table = document.getElementById(input.dataset.table);
  const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
  let shown = 0;
  for (const row of table.tBodies[0].rows) {
    const text = row.dataset.search || row.textContent.toLowerCase();
    const keep = words.every((w) => text.includes(w));
    row.hidden = !keep;
    if (keep) shown += 1;
  }
  const count = document.getElementById(input.dataset.table + "-count");
  if (count) count.textContent = shown;
}

function sortTable(th) {
  const table = th.closest("table");
  const column = Array.from(th.parentNode.children).indexOf(th);
  const ascending = !th.classList.contains("sorted-asc");
  for (const other of th.parentNode.children) other.classList.remove("sorted-asc", "sorted-desc");
  th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
  const rows = Array.from(table.tBodies[0].rows);
  const key = (row) => {
    const cell = row.children[column];
    const value = cell.dataset.value ?? cell.textContent.trim();
    const number = Number(value);
    return value !== "" && !Number.isNaN(number) ? number : value.toLowerCase();
  };
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === y) return 0;
    const less = typeof x === typeof y ? x < y : typeof x === "number";
    return (less ? -1 : 1) * (ascending ? 1 : -1);
  });
  table.tBodies[0].append(...rows);
}

document.addEventListener("input", (e) => {
  if (e.target.matches("input[data-table]")) filterTable(e.target);
});
document.addEventListener("submit", (e) => {  // no inline handlers: the CSP allows none
  if (e.target.id === "playground") {
    e.preventDefault();
    runPlayground(e.target);
  } else if (e.target.id === "login") {
    rememberKey(e.target);
  }
});
document.addEventListener("click", (e) => {
  if (e.target.matches("th[data-sort]")) sortTable(e.target);
});

// sign in: the key stays in this tab (the playground calls the API with it); the
// server keeps a session for the pages
function rememberKey(form) {
  sessionStorage.setItem("zoo-key", form.key.value);
}

// the playground: one prompt, each picked model's answer streamed into its own column,
// through the server's own OpenAI API with this tab's key
async function streamAnswer(model, prompt, box, maxTokens) {
  const key = sessionStorage.getItem("zoo-key");
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  box.textContent = "";
  box.dataset.state = "streaming";
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers,
    body: JSON.stringify({model, stream: true, max_tokens: maxTokens, temperature: 0,
                          messages: [{role: "user", content: prompt}]}),
  });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    box.textContent = "error " + response.status + ": " + ((error.error || {}).message || "");
    box.dataset.state = "error";
    return;
  }
  // which version of the name answered (a canary may answer some people)
  box.dataset.answeredBy = response.headers.get("x-zoo-model") || model;
  const title = box.parentElement.querySelector("h2");
  if (title && box.dataset.answeredBy !== model) title.textContent = model + " → " + box.dataset.answeredBy;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  box.dataset.chunks = "0";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    pending += decoder.decode(value, {stream: true});
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line.trim() === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      const delta = ((event.choices || [])[0] || {}).delta || {};
      if (delta.content) {
        box.textContent += delta.content;
        box.dataset.chunks = String(Number(box.dataset.chunks) + 1);
      }
    }
  }
  box.dataset.state = "done";
}

function runPlayground(form) {
  const prompt = form.prompt.value;
  const picked = Array.from(form.querySelectorAll("input[name=model]:checked")).map((i) => i.value);
  const answers = document.getElementById("answers");
  answers.replaceChildren();
  for (const model of picked) {
    const card = document.createElement("div");
    card.className = "card";
    const title = document.createElement("h2");
    title.textContent = model;
    const box = document.createElement("pre");
    box.className = "answer";
    box.dataset.model = model;
    card.append(title, box);
    answers.append(card);
    streamAnswer(model, prompt, box, Number(form.max_tokens.value) || 64);
  }
}
