// The console's enhancements. Every page works without this file: it only asks before a
// deletion or a revocation, and copies a new token's secret at a click.
"use strict";

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

async function copyField(button) {
  const field = document.getElementById(button.dataset.copy);
  const status = document.getElementById("copy-status");
  field.select();
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    document.execCommand("copy"); // where the clipboard API is refused (no secure context)
  }
  if (status) {
    status.textContent = "Copied to the clipboard.";
  }
}

for (const button of document.querySelectorAll("button[data-copy]")) {
  button.hidden = false;
  button.addEventListener("click", () => copyField(button));
}
