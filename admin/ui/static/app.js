// credgate admin UI: small progressive enhancements; every page also works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Dialog pages open their dialog modally: the browser then traps focus inside it and Escape closes it.
  for (const dialog of document.querySelectorAll("dialog[data-modal]")) {
    dialog.classList.remove("static");
    if (dialog.open) dialog.close();
    dialog.showModal();
    const first = dialog.querySelector("[autofocus], input:not([type=hidden]), button, a[href]");
    if (first) first.focus();
    dialog.addEventListener("cancel", (event) => {
      const back = dialog.dataset.back;
      if (dialog.hasAttribute("data-no-escape")) { event.preventDefault(); return; }
      if (back) { event.preventDefault(); window.location.assign(back); }
    });
  }

  // Copy buttons copy the value of the field they name.
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      if (!field) return;
      try {
        await navigator.clipboard.writeText(field.value);
      } catch (_) {
        field.select();
        document.execCommand("copy");
      }
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 1500);
    });
  }

  // "I have copied the secret" enables Close.
  for (const box of document.querySelectorAll("input[data-enables]")) {
    const target = document.getElementById(box.dataset.enables);
    const sync = () => { if (target) target.disabled = !box.checked; };
    box.addEventListener("change", sync);
    sync();
  }

  // Delete confirmations: the button stays disabled until the credential's name is typed exactly.
  for (const input of document.querySelectorAll("input[data-confirm]")) {
    const target = document.getElementById(input.dataset.target);
    const sync = () => { if (target) target.disabled = input.value !== input.dataset.confirm; };
    input.addEventListener("input", sync);
    sync();
  }

  // Filters submit as soon as a select changes.
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form && select.form.requestSubmit());
  }
});
