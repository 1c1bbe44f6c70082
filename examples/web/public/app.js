// The web demo's page logic: a drawing pad (mouse, pen, touch), uploads, and the result view.
// Plain browser JavaScript, no build step and nothing fetched from outside.
'use strict';

(() => {
  const pad = document.getElementById('pad');
  const ctx = pad.getContext('2d');
  const model = document.getElementById('model');
  const fileInput = document.getElementById('file');
  const buttons = [document.getElementById('clear'), document.getElementById('classify')];
  const result = document.getElementById('result');
  const errorBox = document.getElementById('error');
  const noticeBox = document.getElementById('notice');
  const topList = document.getElementById('top');
  const timing = document.getElementById('timing');
  const source = document.getElementById('source');
  const idle = document.getElementById('idle');
  let last = null; // {blob, name}: re-sent when the model changes

  // A white background, not transparent: the digits model inverts dark ink on a light page,
  // and a transparent PNG would decode as black.
  function clearPad() {
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, pad.width, pad.height);
  }

  function isBlank() {
    const data = ctx.getImageData(0, 0, pad.width, pad.height).data;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] < 250 || data[i + 1] < 250 || data[i + 2] < 250) return false;
    }
    return true;
  }

  // Pointer events cover mouse, pen and touch alike; CSS touch-action: none keeps the page
  // from scrolling while a finger draws.
  let drawing = false;
  function point(ev) {
    const box = pad.getBoundingClientRect();
    return [(ev.clientX - box.left) * pad.width / box.width,
      (ev.clientY - box.top) * pad.height / box.height];
  }
  pad.addEventListener('pointerdown', (ev) => {
    drawing = true;
    pad.setPointerCapture(ev.pointerId);
    const [x, y] = point(ev);
    ctx.strokeStyle = '#000';
    ctx.fillStyle = '#000';
    ctx.lineWidth = 22;
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.beginPath();
    ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
    ctx.beginPath();
    ctx.moveTo(x, y);
    ev.preventDefault();
  });
  pad.addEventListener('pointermove', (ev) => {
    if (!drawing) return;
    const [x, y] = point(ev);
    ctx.lineTo(x, y);
    ctx.stroke();
    ev.preventDefault();
  });
  for (const type of ['pointerup', 'pointercancel']) {
    pad.addEventListener(type, () => { drawing = false; });
  }

  function setBusy(busy) {
    if (busy) result.dataset.state = 'busy';
    for (const el of [...buttons, model, fileInput]) el.disabled = busy;
  }

  // data-state (busy, done, error) and data-answers (how many so far) let a test wait for
  // the next answer.
  function answered(state) {
    result.dataset.state = state;
    result.dataset.answers = String(Number(result.dataset.answers || 0) + 1);
  }

  function showError(message) {
    topList.replaceChildren();
    timing.hidden = true;
    noticeBox.hidden = true;
    errorBox.textContent = message;
    errorBox.hidden = false;
    answered('error');
  }

  function ms(us) {
    return us === null || us === undefined ? '–' : (us / 1000).toFixed(2) + ' ms';
  }

  function show(data, browserMs) {
    errorBox.hidden = true;
    noticeBox.hidden = !data.notice;
    noticeBox.textContent = data.notice ? 'Notice: ' + data.notice : '';
    topList.replaceChildren(...data.top.map((row) => {
      const li = document.createElement('li');
      const label = document.createElement('span');
      label.className = 'label';
      label.textContent = row.label;
      const bar = document.createElement('span');
      bar.className = 'bar';
      const fill = document.createElement('span');
      fill.style.width = Math.max(0, Math.min(100, row.score * 100)).toFixed(1) + '%';
      bar.append(fill);
      const score = document.createElement('span');
      score.className = 'score';
      score.textContent = (row.score * 100).toFixed(1) + '%';
      li.append(label, bar, score);
      return li;
    }));
    const t = data.timing;
    const server = (t.queue_us || 0) + (t.preprocess_us || 0) + (t.compute_us || 0);
    const rows = [
      ['PHP total (classify.php, start to answer)', ms(t.php_total_us), ''],
      ['TensorBridge round trip ($client->classify())', ms(t.round_trip_us), 'sub'],
      ['server preprocessing (decode, resize)', ms(t.preprocess_us), 'sub2'],
      ['model compute', ms(t.compute_us), 'sub2'],
      ['queue', ms(t.queue_us), 'sub2'],
      // Not shown when the server's stages overlap (e.g. a queue time that counts preprocessing).
      ['transport and PHP client (the rest)', t.round_trip_us >= server ? ms(t.round_trip_us - server) : '–', 'sub2'],
      ['browser: fetch() to answer', browserMs.toFixed(2) + ' ms', 'muted'],
    ];
    timing.tBodies[0].replaceChildren(...rows.map(([name, value, cls]) => {
      const tr = document.createElement('tr');
      tr.className = cls;
      const th = document.createElement('th');
      th.textContent = name;
      const td = document.createElement('td');
      td.textContent = value;
      tr.append(th, td);
      return tr;
    }));
    timing.hidden = false;
    answered('done');
  }

  async function classify(blob, name) {
    last = { blob, name };
    idle.hidden = true;
    source.textContent = '(' + name + ', ' + model.value + ')';
    const form = new FormData();
    form.append('model', model.value);
    form.append('image', blob, name);
    setBusy(true);
    const t0 = performance.now();
    try {
      const reply = await fetch('classify.php', { method: 'POST', body: form });
      let data;
      try {
        data = await reply.json();
      } catch {
        throw new Error('the web server answered HTTP ' + reply.status + ' without JSON; see .run/web/nginx-error.log');
      }
      const browserMs = performance.now() - t0;
      setBusy(false);
      if (data.ok) show(data, browserMs); else showError(data.error);
    } catch (err) {
      setBusy(false);
      showError('The request failed: ' + err.message);
    }
  }

  document.getElementById('clear').addEventListener('click', clearPad);
  document.getElementById('classify').addEventListener('click', () => {
    if (isBlank()) {
      showError('The drawing pad is empty: draw a digit first.');
      return;
    }
    pad.toBlob((blob) => classify(blob, 'drawing.png'), 'image/png');
  });
  fileInput.addEventListener('change', () => {
    const file = fileInput.files[0];
    fileInput.value = ''; // so that picking the same file again classifies it again
    if (file) classify(file, file.name);
  });
  model.addEventListener('change', () => {
    if (last) classify(last.blob, last.name);
  });

  clearPad();
})();
