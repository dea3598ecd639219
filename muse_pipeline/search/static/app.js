
'use strict';
const form = document.getElementById('search-form');
const grid = document.getElementById('grid');
const statusLine = document.getElementById('status');
const player = document.getElementById('player');
const video = document.getElementById('video');
const nowPlaying = document.getElementById('now-playing');
let clipEnd = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function seconds(v) { return v === null || v === undefined ? '?' : Number(v).toFixed(1) + ' s'; }

function play(hit) {
  player.hidden = false;
  clipEnd = hit.end;
  nowPlaying.textContent = hit.id + ' from ' + seconds(hit.start) + (hit.caption ? ': ' + hit.caption : '');
  video.dataset.id = hit.id;
  video.addEventListener('loadedmetadata', () => {
    video.currentTime = hit.start || 0;
    video.play().catch((err) => { statusLine.textContent = 'cannot play: ' + err.message; });
  }, { once: true });
  video.src = hit.video_url;
  video.load();
  player.scrollIntoView({ block: 'nearest' });
}

video.addEventListener('timeupdate', () => {
  if (clipEnd !== null && video.currentTime >= clipEnd) video.pause();
});
video.addEventListener('error', () => { statusLine.textContent = 'this video cannot be played by the browser'; });

function render(data) {
  grid.replaceChildren();
  statusLine.textContent = data.hits.length + ' hits for "' + data.query + '" in ' + data.ms + ' ms';
  for (const hit of data.hits) {
    const card = el('article', 'hit');
    card.tabIndex = 0;
    card.dataset.id = hit.id;
    const img = el('img');
    img.src = hit.thumb_url;
    img.alt = 'frames of ' + hit.id;
    img.loading = 'lazy';
    img.addEventListener('error', () => img.replaceWith(el('p', 'err', 'no preview')));
    const meta = el('div', 'meta');
    meta.append(el('span', 'rank', hit.rank + '. '), el('span', 'score', hit.score.toFixed(4)), ' ',
                el('span', 'id', hit.id), ' ', el('span', 'window', '[' + seconds(hit.start) + ' - ' + seconds(hit.end) + ']'));
    card.append(img, meta);
    if (hit.caption) card.append(el('div', 'caption', hit.caption));
    card.addEventListener('click', () => play(hit));
    card.addEventListener('keydown', (e) => { if (e.key === 'Enter') play(hit); });
    grid.append(card);
  }
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const q = document.getElementById('q').value;
  const k = document.getElementById('k').value;  // empty: the server's default
  statusLine.textContent = 'searching...';
  try {
    const response = await fetch('/search?' + new URLSearchParams(k ? { q: q, k: k } : { q: q }));
    const data = await response.json();
    if (!response.ok) {
      const detail = typeof data.detail === 'string' ? data.detail : JSON.stringify(data.detail);
      statusLine.textContent = 'error: ' + detail;
      return;
    }
    render(data);
  } catch (err) {
    statusLine.textContent = 'error: ' + err.message;
  }
});
