// The console's only script (served from /console/assets, allowed by the page's CSP):
// the model picker's type-to-filter, the copy button of a new key, and table rows that
// open their record. Every page works without it.
"use strict";

document.addEventListener("DOMContentLoaded", function () {
  // Type to filter: <input data-filter="list-id"> hides the list's items whose
  // data-name does not contain what was typed.
  document.querySelectorAll("input[data-filter]").forEach(function (input) {
    var list = document.getElementById(input.getAttribute("data-filter"));
    if (!list) return;
    var apply = function () {
      var wanted = input.value.trim().toLowerCase();
      list.querySelectorAll("li[data-name]").forEach(function (item) {
        var name = item.getAttribute("data-name").toLowerCase();
        item.hidden = wanted !== "" && name.indexOf(wanted) === -1;
      });
    };
    input.addEventListener("input", apply);
    // Enter in the filter must not submit the key's form.
    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter") event.preventDefault();
    });
    apply();
  });

  // Copy buttons: <button data-copy="input-id">.
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      if (!field) return;
      var done = function () {
        button.textContent = "Copied";
      };
      field.select();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          if (document.execCommand("copy")) done();
        });
      } else if (document.execCommand("copy")) {
        done();
      }
    });
  });

  // Rows that open a page: a click anywhere on the row (the link in it serves keyboards).
  document.querySelectorAll("tr[data-href]").forEach(function (row) {
    row.addEventListener("click", function (event) {
      if (event.target.closest("a, button, input")) return;
      window.location.href = row.getAttribute("data-href");
    });
  });
});
