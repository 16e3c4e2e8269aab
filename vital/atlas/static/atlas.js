// VITAL atlas: search, sort and filter the unit cards of a layer page. Shipped with the package;
// the cards are plain HTML, so a page reads without this script. Nothing is fetched.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  if (!grid) { return; }
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  var search = document.getElementById("search");
  var sort = document.getElementById("sort");
  var filter = document.getElementById("filter");
  var count = document.getElementById("count");
  var loopRank = { disagree: 0, agree: 1, none: 2 };

  function matches(card, words, show) {
    var text = (card.dataset.label + "|" + card.dataset.candidates).toLowerCase();
    var okText = words.every(function (w) { return text.indexOf(w) >= 0; });
    return okText && (show === "all" || card.dataset.loop === show);
  }

  function apply() {
    var words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    var show = filter.value, shown = 0;
    cards.forEach(function (card) {
      var ok = matches(card, words, show);
      card.style.display = ok ? "" : "none";
      shown += ok ? 1 : 0;
    });
    count.textContent = shown + " shown";
  }

  function reorder() {
    var key = sort.value;
    var sorted = cards.slice().sort(function (a, b) {
      if (key === "unit") { return a.dataset.unit - b.dataset.unit; }
      if (key === "loop") {
        return (loopRank[a.dataset.loop] - loopRank[b.dataset.loop]) ||
          (a.dataset.unit - b.dataset.unit);
      }
      return (parseFloat(b.dataset[key]) - parseFloat(a.dataset[key])) ||
        (a.dataset.unit - b.dataset.unit);
    });
    sorted.forEach(function (card) { grid.appendChild(card); });
  }

  search.addEventListener("input", apply);
  filter.addEventListener("change", apply);
  sort.addEventListener("change", reorder);
  apply();
}());
