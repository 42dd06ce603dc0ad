// Shows every <time data-ms> in the browser's local time.
document.querySelectorAll('time[data-ms]').forEach(function (t) {
  var d = new Date(Number(t.getAttribute('data-ms')));
  if (!isNaN(d)) { t.textContent = d.toLocaleString(); t.title = d.toISOString(); }
});
