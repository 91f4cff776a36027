(function () {
  const data = JSON.parse(document.getElementById('report-data').textContent);
  const rows = data.rows, media = data.media, size = data.pageSize;
  const list = document.getElementById('cards');
  const status = document.getElementById('status'), flagged = document.getElementById('flagged');
  const text = document.getElementById('text'), info = document.getElementById('page-info');
  let page = 0, shown = rows;

  function el(tag, cls, content) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined && content !== null) e.textContent = String(content);
    return e;
  }
  function isFlagged(r) { return r.checks && r.checks !== 'ok'; }
  function num(v, digits) { return (v === null || v === undefined || v === '') ? '-' : Number(v).toFixed(digits); }

  function card(r) {
    const c = el('article', 'card');
    c.dataset.status = r.status;
    const h = el('h2');
    h.append(el('span', 'badge ' + r.status, r.status.replace('_', ' ')), el('span', null, r.row_id));
    if (r.checks) h.append(el('span', isFlagged(r) ? 'flag' : 'ok', isFlagged(r) ? 'flagged: ' + r.checks : 'checks ok'));
    c.append(h);
    const dl = el('dl');
    const add = (k, v, cls) => { if (v === null || v === undefined || v === '') return; dl.append(el('dt', null, k), el('dd', cls, v)); };
    add('prompt', r.prompt);
    add('input', r.input + '  [' + num(r.start, 3) + ' - ' + num(r.end, 3) + ' s]');
    if (r.damaged) {
      const spans = r.damaged.split(' ');
      add('damaged', spans.length <= 6 ? r.damaged
        : spans.slice(0, 6).join(' ') + ' and ' + (spans.length - 6) + ' more spans (report.csv lists them all)');
    }
    add('seed', r.seed);
    add('provider', r.provider + (r.prediction_id ? ' (prediction ' + r.prediction_id + ')' : ''));
    add('cost', '$' + num(r.cost_usd, 4) + (r.attempts > 1 ? ' after ' + r.attempts + ' attempts' : ''));
    add('method', r.method);  // how it was made (from what, when it cost nothing)
    add('output', r.output);
    add('reused from', r.reused_from);
    add('combined into', r.combined);
    add('error', r.error, 'error');
    if (r.checks) {
      add('checks', 'outside the region ' + (r.outside_max_diff === 0 ? 'untouched' : 'max diff ' + r.outside_max_diff)
        + ' · seams ' + num(r.seam_in, 2) + ' / ' + num(r.seam_out, 2)
        + ' · loudness vs context ' + (r.loudness_delta_db === null ? '-' : num(r.loudness_delta_db, 1) + ' dB')
        + ' · clipped ' + r.clipped + ' · alignment ' + num(r.offset_ms, 2) + ' ms');
    }
    for (const [k, v] of Object.entries(r.extra || {})) add(k, v);
    c.append(dl);
    const m = media[r.row_id];
    if (m) {
      const img = el('img');
      img.alt = 'waveform and spectrogram of ' + r.row_id + ', before and after';
      img.loading = 'lazy';
      img.src = m.image;
      const figure = el('figure');
      const caption = el('figcaption', null, 'before | after: waveform over spectrogram, ' + m.caption);
      figure.append(img, caption);
      c.append(figure);
      const players = el('div', 'players');
      for (const which of ['before', 'after']) {
        const label = el('label', null, which);
        const audio = el('audio');
        audio.controls = true; audio.preload = 'none'; audio.src = m[which];
        label.append(audio);
        players.append(label);
      }
      c.append(players);
    }
    return c;
  }

  function filter() {
    const s = status.value, f = flagged.checked, q = text.value.trim().toLowerCase();
    shown = rows.filter(r => (!s || r.status === s) && (!f || isFlagged(r))
      && (!q || [r.row_id, r.prompt, r.input, r.error].join(' ').toLowerCase().includes(q)));
    page = 0;
    draw();
  }

  function draw() {
    const pages = Math.max(1, Math.ceil(shown.length / size));
    page = Math.min(page, pages - 1);
    list.replaceChildren(...shown.slice(page * size, (page + 1) * size).map(card));
    info.textContent = shown.length + ' results · page ' + (page + 1) + ' of ' + pages;
    document.getElementById('prev').disabled = page === 0;
    document.getElementById('next').disabled = page >= pages - 1;
  }

  status.addEventListener('change', filter);
  flagged.addEventListener('change', filter);
  text.addEventListener('input', filter);
  document.getElementById('prev').addEventListener('click', () => { page--; draw(); window.scrollTo(0, 0); });
  document.getElementById('next').addEventListener('click', () => { page++; draw(); window.scrollTo(0, 0); });
  draw();
  document.body.dataset.ready = 'true';
})();
