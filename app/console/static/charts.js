// Events per bucket stacked by level (uPlot): each band is drawn at the sum of its level and those below it.
(function () {
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const levels = ["debug", "info", "warning", "error", "critical"];
  const colours = {debug: "#5f6368", info: "#0b57d0", warning: "#8a5300", error: "#b3261e", critical: "#6a1b9a"};
  const raw = levels.map((level) => data.levels[level]);
  const stacked = [];
  raw.forEach((values, i) => stacked.push(values.map((v, j) => v + (i ? stacked[i - 1][j] : 0))));
  const el = document.getElementById("chart");
  const opts = {
    width: Math.max(300, el.clientWidth), height: 300,
    series: [{}].concat(levels.map((level, i) => ({
      label: level, stroke: colours[level], fill: colours[level] + "99", width: 1,
      value: (u, v, s, idx) => (idx == null ? "" : raw[i][idx]),
    }))),
    bands: levels.slice(1).map((_, i) => ({series: [i + 2, i + 1]})),
    scales: {y: {range: (u, min, max) => [0, Math.max(1, max)]}},
  };
  const plot = new uPlot(opts, [data.times].concat(stacked), el);
  el.dataset.points = String(data.times.length);
  window.addEventListener("resize", () => plot.setSize({width: Math.max(300, el.clientWidth), height: 300}));
})();
