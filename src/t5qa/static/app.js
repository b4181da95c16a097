// The t5qa web page: sends the question to POST /v1/answer and shows the answer and its timing.
// All text from the user or the server goes through textContent, never innerHTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  function keyHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").textContent = "";
    $("error").hidden = true;
  }

  function ms(seconds) {
    return seconds < 1 ? (seconds * 1000).toFixed(0) + " ms" : seconds.toFixed(2) + " s";
  }

  function optionalInt(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }

  async function readError(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") return body.error;
      if (body && body.detail) return JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    return response.statusText || "request failed";
  }

  async function loadInfo() {
    try {
      const response = await fetch("/health", { headers: keyHeaders() });
      if (response.status === 401) {
        $("key-row").hidden = false;
        $("server-info").textContent = "t5qa server (API key required)";
        return;
      }
      if (!response.ok) return;
      const info = await response.json();
      const parts = ["model " + (info.model || "loaded"), "backend " + (info.backend || "?")];
      if (info.base_model) parts.splice(1, 0, "from " + info.base_model);
      $("server-info").textContent = parts.join(" · ");
    } catch (e) {
      $("server-info").textContent = "server unreachable";
    }
  }

  async function ask(event) {
    event.preventDefault();
    clearError();
    const body = { context: $("context").value, question: $("question").value };
    const numBeams = optionalInt("num-beams");
    const maxNewTokens = optionalInt("max-new-tokens");
    if (numBeams !== undefined) body.num_beams = numBeams;
    if (maxNewTokens !== undefined) body.max_new_tokens = maxNewTokens;
    if ($("grounded").checked) body.grounded = true;

    $("ask").disabled = true;
    $("busy").hidden = false;
    const started = performance.now();
    try {
      const response = await fetch("/v1/answer", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json" }, keyHeaders()),
        body: JSON.stringify(body),
      });
      const roundTrip = (performance.now() - started) / 1000;
      if (!response.ok) {
        if (response.status === 401) $("key-row").hidden = false;
        showError("Error " + response.status + ": " + (await readError(response)));
        return;
      }
      const data = await response.json();
      const answer = data.answer || data.answers[0];
      $("answer").textContent = answer.text === "" ? "(no answer found in the context)" : answer.text;
      $("answer").classList.toggle("empty", answer.text === "");
      showWhere(body.context, answer);
      $("timing").textContent = "model " + ms(data.model_seconds) + " · server " + ms(data.server_seconds) +
        " · round trip " + ms(roundTrip);
      const score = answer.score === null ? "n/a" : answer.score.toFixed(3);
      $("details").textContent = "score " + score + " · window " + (answer.window_index + 1) + " of " +
        answer.num_windows + " · batched with " + (data.batch_pairs - 1) + " other question(s)";
      $("result").hidden = false;
    } catch (e) {
      showError("Could not reach the server: " + e.message);
    } finally {
      $("ask").disabled = false;
      $("busy").hidden = true;
    }
  }

  // The answer in its context: a stretch of the text around it, the answer marked (text nodes only).
  function showWhere(context, answer) {
    const where = $("where");
    where.replaceChildren();
    if (answer.answer_char_start === null || answer.answer_char_start === undefined) {
      where.textContent = answer.text === "" ? "" : "(this answer is not in the text)";
      where.hidden = answer.text === "";
      return;
    }
    const start = answer.answer_char_start, end = answer.answer_char_end, around = 160;
    const from = Math.max(0, start - around), to = Math.min(context.length, end + around);
    const mark = document.createElement("mark");
    mark.textContent = context.slice(start, end);
    where.append((from > 0 ? "…" : "") + context.slice(from, start), mark,
                 context.slice(end, to) + (to < context.length ? "…" : ""));
    where.hidden = false;
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("ask-form").addEventListener("submit", ask);
    $("api-key").addEventListener("change", loadInfo);
    loadInfo();
  });
})();
