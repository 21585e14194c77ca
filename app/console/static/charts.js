// Events per bucket stacked by level (uPlot bars): each level is drawn at the sum of itself and the
// levels below it, the tallest first, so every level shows as its own slice of the bar.
(function () {
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const levels = ["debug", "info", "warning", "error", "critical"];
  const colours = {debug: "#5f6368", info: "#0b57d0", warning: "#8a5300", error: "#b3261e", critical: "#6a1b9a"};
  const stacked = [];
  levels.forEach((level, i) => stacked.push(data.levels[level].map((v, j) => v + (i ? stacked[i - 1][j] : 0))));
  const order = levels.map((_, i) => i).reverse();
  const bars = uPlot.paths.bars({size: [0.8, 40]});
  const el = document.getElementById("chart");
  const opts = {
    width: Math.max(300, el.clientWidth), height: 300,
    series: [{}].concat(order.map((i) => ({
      label: levels[i], stroke: colours[levels[i]], fill: colours[levels[i]], paths: bars, points: {show: false},
      value: (u, v, s, idx) => (idx == null ? "" : data.levels[levels[i]][idx]),
    }))),
    scales: {y: {range: (u, min, max) => [0, Math.max(1, max)]}},
  };
  const plot = new uPlot(opts, [data.times].concat(order.map((i) => stacked[i])), el);
  el.dataset.points = String(data.times.reduce((n, _, j) => n + (stacked[levels.length - 1][j] ? 1 : 0), 0));
  window.addEventListener("resize", () => plot.setSize({width: Math.max(300, el.clientWidth), height: 300}));
})();
