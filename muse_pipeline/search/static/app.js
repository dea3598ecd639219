
'use strict';
const form = document.getElementById('search-form');
const grid = document.getElementById('grid');
const statusLine = document.getElementById('status');
const player = document.getElementById('player');
const video = document.getElementById('video');
const nowPlaying = document.getElementById('now-playing');
const span = document.getElementById('moment-span');
let clipEnd = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function secs(v) { return v === null || v === undefined ? '?' : Number(v).toFixed(1); }
// A hit is a moment of its file: start (s), end (s; null when the file's length is unknown).
function momentLabel(hit) { return secs(hit.start || 0) + '-' + secs(hit.end) + ' s'; }

// The moment drawn over the file's timeline (the bar under the player): where it starts and ends.
function markSpan(hit) {
  const total = video.duration;
  if (!isFinite(total) || total <= 0) { span.hidden = true; return; }
  const lo = Math.min(1, (hit.start || 0) / total);
  const hi = Math.min(1, (hit.end === null ? total : hit.end) / total);
  span.hidden = false;
  span.firstElementChild.style.left = (100 * lo) + '%';
  span.firstElementChild.style.width = Math.max(0.5, 100 * (hi - lo)) + '%';
}

function play(hit) {
  if (hit.missing) {
    statusLine.textContent = 'the file of ' + hit.id + ' no longer exists: ' + hit.path;
    return;
  }
  player.hidden = false;
  clipEnd = hit.end;
  nowPlaying.textContent = hit.id + ': moment ' + momentLabel(hit) + (hit.caption ? ': ' + hit.caption : '');
  video.dataset.id = hit.id;
  video.dataset.start = String(hit.start || 0);
  video.dataset.end = hit.end === null ? '' : String(hit.end);
  video.addEventListener('loadedmetadata', () => {
    video.currentTime = hit.start || 0;
    markSpan(hit);
    video.play().catch((err) => { statusLine.textContent = 'cannot play: ' + err.message; });
  }, { once: true });
  video.src = hit.video_url;
  video.load();
  player.scrollIntoView({ block: 'nearest' });
}

// Stop at the moment's end (once: playing on past it afterwards is the user's choice).
video.addEventListener('timeupdate', () => {
  if (clipEnd !== null && video.currentTime >= clipEnd) {
    video.pause();
    nowPlaying.textContent += ' (end of the moment)';
    clipEnd = null;
  }
});
video.addEventListener('error', () => { statusLine.textContent = 'this video cannot be played by the browser'; });

function hitCard(hit, title) {
  const card = el('article', hit.missing ? 'hit missing' : 'hit');
  card.tabIndex = 0;
  card.dataset.id = hit.id;
  card.dataset.start = String(hit.start || 0);
  const img = el('img');
  img.src = hit.thumb_url;
  img.alt = 'frames of ' + hit.id;
  img.loading = 'lazy';
  img.addEventListener('error', () => img.replaceWith(el('p', 'err', 'no preview')));
  const meta = el('div', 'meta');
  meta.append(el('span', 'rank', title + '. '), el('span', 'score', hit.score.toFixed(4)), ' ',
              el('span', 'moment', momentLabel(hit)), ' ', el('span', 'id', hit.id));
  card.append(img, meta);
  if (hit.missing) card.append(el('div', 'err gone', 'file missing: ' + hit.path));
  if (hit.caption) card.append(el('div', 'caption', hit.caption));
  card.addEventListener('click', () => play(hit));
  card.addEventListener('keydown', (e) => { if (e.key === 'Enter') play(hit); });
  return card;
}

// Per video: one card per file (its best moment), then a button for each of its other moments.
function groupCard(group) {
  const card = hitCard(group.moments[0], group.rank);
  card.classList.add('group');
  card.dataset.source = group.source;
  if (group.moments.length > 1) {
    const more = el('div', 'moments');
    for (const moment of group.moments.slice(1)) {
      const button = el('button', 'moment-button', momentLabel(moment) + ' (' + moment.score.toFixed(3) + ')');
      button.type = 'button';
      button.addEventListener('click', (e) => { e.stopPropagation(); play(moment); });
      more.append(button);
    }
    card.append(more);
  }
  return card;
}

function render(data) {
  grid.replaceChildren();
  if (data.groups) {
    statusLine.textContent = data.groups.length + ' videos (' + data.hits.length + ' moments) for "' +
      data.query + '" in ' + data.ms + ' ms';
    for (const group of data.groups) grid.append(groupCard(group));
    return;
  }
  statusLine.textContent = data.hits.length + ' hits for "' + data.query + '" in ' + data.ms + ' ms';
  for (const hit of data.hits) grid.append(hitCard(hit, hit.rank));
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const q = document.getElementById('q').value;
  const k = document.getElementById('k').value;  // empty: the server's default
  const params = k ? { q: q, k: k } : { q: q };
  if (document.getElementById('group').checked) params.group = 'true';
  statusLine.textContent = 'searching...';
  try {
    const response = await fetch('/search?' + new URLSearchParams(params));
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
