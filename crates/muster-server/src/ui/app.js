// Muster web console.
//
// A client of the node's REST API and nothing else:
//   - every instance comes from the SSE watch (/v1/registry/watch). The first
//     connection asks for start_revision=1, so the node replays its history or, when
//     that is compacted, sends a `reset` holding every instance; either way the page
//     holds the full registry without a list-then-watch race. `put` and `delete`
//     update it, `reset` replaces it, `progress` moves the revision. The browser
//     resumes a dropped stream by itself with Last-Event-ID; when it gives up, the
//     page reopens it with start_revision = last revision + 1.
//   - the cluster panel polls /v1/cluster/status and /v1/cluster/members.
//   - the lease column polls /v1/registry/leases for the leases of the shown
//     service and counts down between polls.
//
// User data (names, ids, tags, metadata, check output) reaches the DOM only as
// text nodes or attribute values, never as markup: see `el`.
'use strict';

(() => {
  const CLUSTER_POLL_MS = 2000;
  const CLUSTER_REFRESH_AFTER_CHANGE_MS = 250;
  const LEASE_POLL_MS = 2000;
  const TTL_TICK_MS = 500;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 15000;
  const MAX_LEASES_ASKED = 1000;
  const HEALTHS = ['passing', 'warning', 'critical'];

  const state = {
    /** Every instance, by instanceKey(). */
    instances: new Map(),
    /** Revision of the last change per service (serviceKey()). */
    serviceRevision: new Map(),
    /** The last revision the watch delivered (0: none yet). */
    revision: 0,
    /** The service shown, from the URL fragment: {namespace, service} or null. */
    selected: null,
    filter: '',
    status: null,
    members: [],
    clusterError: null,
    /** Lease id -> {remaining, exact, at} (at: performance.now() of the answer) or {gone: true}. */
    leases: new Map(),
    stream: 'connecting',
    streamError: null,
  };

  // ---- helpers ------------------------------------------------------------

  /** An API URL, relative to the page (/ui/ -> /v1/...), so a path prefix works. */
  const api = (path) => new URL('../v1/' + path, document.baseURI);

  const $ = (id) => document.getElementById(id);

  /**
   * Creates an element. Children that are not nodes become text nodes, and
   * attributes are set with setAttribute, so no string is ever parsed as HTML.
   */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** An empty cell: a dash on screen, "none" to a screen reader. */
  const dash = () =>
    el('span', { class: 'none' }, el('span', { 'aria-hidden': 'true' }, '—'), el('span', { class: 'visually-hidden' }, 'none'));

  const serviceKey = (namespace, service) => JSON.stringify([namespace, service]);
  const instanceKey = (namespace, service, id) => JSON.stringify([namespace, service, id]);

  function formatDuration(ms) {
    if (ms < 10000) return (ms / 1000).toFixed(1) + ' s';
    const s = Math.round(ms / 1000);
    if (s < 120) return s + ' s';
    const m = Math.floor(s / 60);
    if (m < 120) return m + ' min ' + (s % 60) + ' s';
    return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
  }

  function isoTime(ms) {
    return typeof ms === 'number' && ms > 0 ? new Date(ms).toISOString() : '';
  }

  function hostPort(address, port) {
    return (address.includes(':') ? '[' + address + ']' : address) + ':' + port;
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      // Not JSON: reported below by status.
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : response.statusText;
      throw new Error(response.status + ' ' + message);
    }
    return body;
  }

  // ---- rendering ------------------------------------------------------------

  let renderQueued = false;

  /** Renders once before the next frame, however many changes arrive first. */
  function invalidate() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  /**
   * Replaces a table body, keeping keyboard focus on the element with the same
   * data-focus key, so live updates do not throw a keyboard user out of the table.
   */
  function replaceRows(tbody, rows) {
    const active = document.activeElement;
    const focusKey = active && tbody.contains(active) ? active.dataset.focus : undefined;
    tbody.replaceChildren(...rows);
    if (focusKey !== undefined) {
      for (const candidate of tbody.querySelectorAll('[data-focus]')) {
        if (candidate.dataset.focus === focusKey) {
          candidate.focus();
          break;
        }
      }
    }
  }

  /** Per table body: row key -> {signature, row} from the last render. */
  const rowCache = new WeakMap();

  /**
   * Renders one row per item, reusing the row of an item whose signature has not
   * changed, so a live update touches only what changed: focus, text selection and
   * hover stay where they are on the other rows.
   */
  function renderKeyed(tbody, items, keyOf, signatureOf, build) {
    const previous = rowCache.get(tbody) || new Map();
    const next = new Map();
    const rows = items.map((item) => {
      const key = keyOf(item);
      const signature = signatureOf(item);
      const old = previous.get(key);
      const row = old && old.signature === signature ? old.row : build(item);
      next.set(key, { signature, row });
      return row;
    });
    rowCache.set(tbody, next);
    const current = tbody.children;
    const unchanged = rows.length === current.length && rows.every((row, i) => row === current[i]);
    if (!unchanged) replaceRows(tbody, rows);
  }

  function healthBadge(health) {
    const known = HEALTHS.includes(health) ? health : 'unknown';
    return el('span', { class: 'badge ' + known }, health);
  }

  function summarizeServices() {
    const services = new Map();
    for (const i of state.instances.values()) {
      const key = serviceKey(i.namespace, i.service);
      let s = services.get(key);
      if (!s) {
        s = { key, namespace: i.namespace, service: i.service, instances: 0, passing: 0, warning: 0, critical: 0 };
        services.set(key, s);
      }
      s.instances += 1;
      if (HEALTHS.includes(i.health)) s[i.health] += 1;
    }
    return [...services.values()].sort(
      (a, b) => a.namespace.localeCompare(b.namespace) || a.service.localeCompare(b.service),
    );
  }

  function healthSummary(s) {
    const parts = HEALTHS.filter((h) => s[h] > 0).map((h) => el('span', { class: 'badge ' + h }, s[h] + ' ' + h));
    const bar = el('span', { class: 'bar', 'aria-hidden': 'true' });
    for (const h of HEALTHS) {
      if (s[h] === 0) continue;
      const segment = el('span', { class: 'segment ' + h });
      segment.style.flexGrow = String(s[h]);
      bar.append(segment);
    }
    return el('div', { class: 'health-summary' }, bar, el('span', { class: 'badges' }, parts));
  }

  function serviceHref(namespace, service) {
    return '#/services/' + encodeURIComponent(namespace) + '/' + encodeURIComponent(service);
  }

  function renderServices(services) {
    const filter = state.filter;
    const shown = filter
      ? services.filter((s) => s.service.includes(filter) || s.namespace.includes(filter))
      : services;
    const selectedKey = state.selected ? serviceKey(state.selected.namespace, state.selected.service) : null;
    const build = (s) => {
      const current = s.key === selectedKey;
      return el(
        'tr',
        { class: current ? 'selected' : null, dataset: { service: s.namespace + '/' + s.service } },
        el(
          'th',
          { scope: 'row' },
          el(
            'a',
            { href: serviceHref(s.namespace, s.service), 'aria-current': current ? 'true' : null, dataset: { focus: s.key } },
            s.service,
          ),
        ),
        el('td', null, s.namespace),
        el('td', { class: 'num', dataset: { count: 'instances' } }, s.instances),
        el('td', null, healthSummary(s)),
        el('td', { class: 'num' }, state.serviceRevision.get(s.key) || ''),
      );
    };
    renderKeyed(
      $('services').tBodies[0],
      shown,
      (s) => s.key,
      (s) => JSON.stringify([s, s.key === selectedKey, state.serviceRevision.get(s.key)]),
      build,
    );
    const instances = state.instances.size;
    $('service-totals').textContent =
      services.length + (services.length === 1 ? ' service, ' : ' services, ') +
      instances + (instances === 1 ? ' instance' : ' instances') +
      (filter ? ' (' + shown.length + ' shown)' : '');
    const empty = $('services-empty');
    empty.hidden = shown.length > 0 || state.stream === 'connecting';
    empty.textContent = services.length === 0 ? 'No services registered.' : 'No service matches the filter.';
  }

  function chips(values, className) {
    if (values.length === 0) return dash();
    return el('ul', { class: 'chips ' + className }, values.map((v) => el('li', null, v)));
  }

  function pairs(map, className) {
    const entries = Object.entries(map || {});
    if (entries.length === 0) return dash();
    return el(
      'dl',
      { class: 'pairs ' + className },
      entries.map(([k, v]) => el('div', null, el('dt', null, k), el('dd', null, String(v)))),
    );
  }

  function healthCell(i) {
    const checks = Array.isArray(i.checks) ? i.checks : [];
    return el(
      'td',
      { dataset: { health: i.health } },
      healthBadge(i.health),
      checks.length === 0
        ? null
        : el(
            'ul',
            { class: 'checks' },
            checks.map((c) =>
              el(
                'li',
                // The maintenance check (no TTL) is explained by its reason.
                { title: (c.ttl_ms === 0 && i.maintenance ? i.maintenance.reason : c.output) || null },
                el('span', { class: 'badge small ' + (HEALTHS.includes(c.status) ? c.status : 'unknown') }, c.status),
                ' ',
                c.name || c.id,
              ),
            ),
          ),
    );
  }

  function leaseCell(i) {
    if (i.lease_id === null || i.lease_id === undefined) {
      return el('td', { class: 'lease' }, el('span', { class: 'none' }, 'no lease'));
    }
    return el(
      'td',
      { class: 'lease' },
      el('span', { class: 'ttl', dataset: { lease: i.lease_id } }, ttlText(i.lease_id)),
      el('span', { class: 'lease-id' }, 'lease ' + i.lease_id),
    );
  }

  function selectedInstances() {
    if (!state.selected) return [];
    const { namespace, service } = state.selected;
    const found = [];
    for (const i of state.instances.values()) {
      if (i.namespace === namespace && i.service === service) found.push(i);
    }
    return found.sort((a, b) => a.instance_id.localeCompare(b.instance_id));
  }

  function renderInstances() {
    const table = $('instances');
    const hint = $('instances-hint');
    const title = $('instances-title');
    if (!state.selected) {
      title.textContent = 'Instances';
      table.hidden = true;
      hint.hidden = false;
      hint.textContent = 'Choose a service to see its instances.';
      $('instance-totals').textContent = '';
      $('lease-note').hidden = true;
      return;
    }
    const { namespace, service } = state.selected;
    title.replaceChildren('Instances of ', el('code', null, service));
    $('instances-caption').textContent = 'Instances of ' + service + ' in namespace ' + namespace;
    const instances = selectedInstances();
    $('instance-totals').textContent =
      'namespace ' + namespace + ' · ' + instances.length + (instances.length === 1 ? ' instance' : ' instances');
    if (instances.length === 0) {
      table.hidden = true;
      hint.hidden = false;
      hint.textContent =
        state.stream === 'connecting' ? 'Loading…' : 'No instances of ' + service + ' are registered.';
      renderKeyed(table.tBodies[0], [], null, null, null);
      $('lease-note').hidden = true;
      return;
    }
    hint.hidden = true;
    table.hidden = false;
    const build = (i) =>
      el(
        'tr',
        { dataset: { instance: i.instance_id } },
        el('th', { scope: 'row' }, el('code', null, i.instance_id)),
        el('td', null, el('code', null, hostPort(i.address, i.port))),
        el(
          'td',
          null,
          Object.keys(i.ports || {}).length === 0
            ? dash()
            : pairs(i.ports, 'ports'),
        ),
        el('td', null, chips(i.tags || [], 'tags')),
        el('td', null, pairs(i.metadata, 'metadata')),
        el('td', null, i.zone ? i.zone : dash()),
        healthCell(i),
        leaseCell(i),
        el(
          'td',
          {
            class: 'num',
            title:
              'created at revision ' + i.create_revision +
              (isoTime(i.registered_at_ms) ? ' (' + isoTime(i.registered_at_ms) + ')' : '') +
              '; last changed ' + (isoTime(i.updated_at_ms) || 'at revision ' + i.mod_revision),
          },
          i.mod_revision,
        ),
      );
    renderKeyed(
      table.tBodies[0],
      instances,
      (i) => instanceKey(i.namespace, i.service, i.instance_id),
      (i) => JSON.stringify(i),
      build,
    );
    $('lease-note').hidden = !instances.some((i) => {
      const l = state.leases.get(i.lease_id);
      return l && !l.gone && !l.exact;
    });
    wantLeases(instances);
  }

  function fact(term, value, attrs) {
    return el('div', attrs || null, el('dt', null, term), el('dd', null, value));
  }

  function renderCluster() {
    const s = state.status;
    const revision = Math.max(s ? s.revision : 0, state.revision);
    $('revision').textContent = s || state.revision ? String(revision) : '…';
    const error = $('error');
    error.hidden = !state.clusterError;
    error.textContent = state.clusterError ? 'Cannot reach this node: ' + state.clusterError : '';
    if (!s) return;
    $('node-id').textContent = String(s.node);
    const role = $('node-role');
    role.textContent = s.role;
    role.className = 'role ' + s.role;
    $('cluster-totals').textContent =
      state.members.length + (state.members.length === 1 ? ' member' : ' members') +
      ' · ' + (s.leader_known ? 'leader: node ' + s.leader : 'no leader known');
    $('cluster-status').replaceChildren(
      fact('This node', 'node ' + s.node + ' (' + s.role + ')'),
      fact('Leader', s.leader_known ? 'node ' + s.leader : 'none known', { dataset: { fact: 'leader' } }),
      fact('Term', s.term, { dataset: { fact: 'term' } }),
      fact('Last log index', s.last_log_index),
      fact('Commit index', s.commit_index),
      fact('Applied index', s.applied_index),
      fact('Snapshot index', s.snapshot_index),
      fact('Lag', s.lag + (s.lag === 1 ? ' entry' : ' entries')),
      fact('Revision', revision, { dataset: { fact: 'revision' } }),
      fact('Leader contact', s.ms_since_leader_contact + ' ms ago'),
      fact('Ready', s.ready ? 'yes' : 'no'),
      fact('Cluster id', s.cluster_id || 'not learned yet', { dataset: { fact: 'cluster-id' } }),
      fact('Command level', s.command_level, { dataset: { fact: 'command-level' } }),
      fact('Registry', s.instances + ' instances · ' + s.services + ' services · ' + s.leases + ' leases', {
        class: 'wide',
        dataset: { fact: 'registry' },
      }),
    );
    const build = (m) => {
      const self = m.node === s.node;
      const role = self ? s.role : m.leader ? 'leader' : m.voter ? 'follower' : 'learner';
      return el(
        'tr',
        { class: self ? 'self' : null, dataset: { member: m.node } },
        el('th', { scope: 'row' }, 'node ' + m.node, self ? el('span', { class: 'you' }, ' (this node)') : null),
        el('td', null, el('span', { class: 'role ' + role }, role), m.voter ? null : el('span', { class: 'none' }, ' non-voting')),
        el('td', null, el('code', null, m.peer_addr)),
        el('td', { class: 'num' }, s.role === 'leader' ? m.matched_index : dash()),
      );
    };
    renderKeyed(
      $('members').tBodies[0],
      state.members,
      (m) => m.node,
      (m) => JSON.stringify([m, s.node, s.role]),
      build,
    );
  }

  function renderStream() {
    document.body.dataset.stream = state.stream;
    const text = {
      connecting: 'Connecting to the watch stream…',
      live: 'Live: changes appear as they happen',
      reconnecting: 'Watch stream interrupted; reconnecting (missed changes are replayed)…',
    }[state.stream];
    $('stream-text').textContent = state.streamError ? text + ' ' + state.streamError : text;
    $('stream-status').className = 'stream ' + state.stream;
  }

  function render() {
    renderStream();
    renderServices(summarizeServices());
    renderInstances();
    renderCluster();
  }

  // ---- leases -------------------------------------------------------------

  function ttlText(leaseId) {
    const l = state.leases.get(leaseId);
    if (!l) return '…';
    if (l.gone) return 'expired';
    if (!l.exact) return '≤ ' + formatDuration(l.remaining);
    const left = l.remaining - (performance.now() - l.at);
    return left > 0 ? formatDuration(left) : 'expiring';
  }

  /** Refreshes the countdowns in place (no re-render, so nothing loses focus). */
  function tickTtls() {
    for (const span of document.querySelectorAll('[data-lease]')) {
      const text = ttlText(Number(span.dataset.lease));
      if (span.textContent !== text) span.textContent = text;
    }
  }

  let leaseIds = [];
  let leaseFetch = null;

  function wantLeases(instances) {
    const ids = [...new Set(instances.map((i) => i.lease_id).filter((id) => typeof id === 'number'))]
      .sort((a, b) => a - b)
      .slice(0, MAX_LEASES_ASKED);
    const changed = ids.join(',') !== leaseIds.join(',');
    leaseIds = ids;
    if (changed && ids.some((id) => !state.leases.has(id))) refreshLeases();
  }

  async function refreshLeases() {
    if (leaseFetch || leaseIds.length === 0) return;
    const ids = leaseIds;
    const url = api('registry/leases');
    for (const id of ids) url.searchParams.append('lease_id', String(id));
    leaseFetch = getJSON(url)
      .then((body) => {
        const at = performance.now();
        const seen = new Set();
        // Forget leases no longer shown.
        const wanted = new Set(leaseIds);
        for (const id of state.leases.keys()) if (!wanted.has(id)) state.leases.delete(id);
        for (const l of body.leases) {
          seen.add(l.lease_id);
          state.leases.set(l.lease_id, { remaining: l.remaining_ms, exact: l.remaining_exact, at });
        }
        for (const id of ids) if (!seen.has(id)) state.leases.set(id, { gone: true });
        $('lease-note').hidden = !body.leases.some((l) => !l.remaining_exact);
        tickTtls();
      })
      .catch(() => {
        // The cluster poll reports an unreachable node; keep counting down.
      })
      .finally(() => {
        leaseFetch = null;
      });
  }

  // ---- cluster ------------------------------------------------------------

  let clusterTimer = null;
  let clusterDue = 0;
  let clusterInFlight = false;

  /** Polls the cluster in `delay` ms (or sooner, if already due sooner). */
  function scheduleCluster(delay) {
    const due = performance.now() + delay;
    if (clusterTimer !== null && clusterDue <= due) return;
    clearTimeout(clusterTimer);
    clusterDue = due;
    clusterTimer = setTimeout(refreshCluster, delay);
  }

  async function refreshCluster() {
    clusterTimer = null;
    if (clusterInFlight) return;
    clusterInFlight = true;
    try {
      const [status, members] = await Promise.all([getJSON(api('cluster/status')), getJSON(api('cluster/members'))]);
      state.status = status;
      state.members = members.members || [];
      state.clusterError = null;
    } catch (e) {
      state.clusterError = e && e.message ? e.message : String(e);
    } finally {
      clusterInFlight = false;
    }
    invalidate();
    scheduleCluster(CLUSTER_POLL_MS);
  }

  // ---- watch --------------------------------------------------------------

  function put(instance) {
    state.instances.set(instanceKey(instance.namespace, instance.service, instance.instance_id), instance);
  }

  function noteServiceRevision(namespace, service, revision) {
    const key = serviceKey(namespace, service);
    if ((state.serviceRevision.get(key) || 0) < revision) state.serviceRevision.set(key, revision);
  }

  const handlers = {
    put(data) {
      put(data.instance);
      noteServiceRevision(data.instance.namespace, data.instance.service, data.revision);
    },
    delete(data) {
      state.instances.delete(instanceKey(data.namespace, data.service, data.instance_id));
      noteServiceRevision(data.namespace, data.service, data.revision);
    },
    reset(data) {
      // The node could not replay what we missed: this is the whole state.
      state.instances.clear();
      state.serviceRevision.clear();
      for (const instance of data.instances) {
        put(instance);
        noteServiceRevision(instance.namespace, instance.service, instance.mod_revision);
      }
      state.revision = data.revision;
    },
    progress() {},
  };

  let source = null;
  let retryTimer = null;
  let retryDelay = RETRY_MIN_MS;

  function setStream(stream, error) {
    state.stream = stream;
    state.streamError = error || null;
    renderStream();
    invalidate();
  }

  function connect() {
    clearTimeout(retryTimer);
    const url = api('registry/watch');
    // 1 on first load: everything (replayed, or a reset). Later: after what we have.
    url.searchParams.set('start_revision', String(state.revision + 1));
    const es = new EventSource(url);
    source = es;
    es.addEventListener('open', () => {
      retryDelay = RETRY_MIN_MS;
      setStream('live');
    });
    for (const [name, handle] of Object.entries(handlers)) {
      es.addEventListener(name, (event) => {
        if (es !== source) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        handle(data);
        if (typeof data.revision === 'number' && data.revision > state.revision) state.revision = data.revision;
        if (state.stream !== 'live') setStream('live');
        invalidate();
        // Indexes moved with the change: show them soon rather than at the next poll.
        if (name !== 'progress') scheduleCluster(CLUSTER_REFRESH_AFTER_CHANGE_MS);
      });
    }
    es.addEventListener('error', () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, say): reopen it ourselves, resuming
        // after the last revision we hold.
        es.close();
        setStream('reconnecting', 'Retrying in ' + Math.round(retryDelay / 1000) + ' s.');
        retryTimer = setTimeout(connect, retryDelay);
        retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
      } else {
        // The browser retries by itself and sends Last-Event-ID.
        setStream('reconnecting');
      }
    });
  }

  // ---- navigation -----------------------------------------------------------

  function readSelection() {
    const match = /^#\/services\/([^/]+)\/([^/]+)$/.exec(location.hash);
    if (!match) return null;
    try {
      return { namespace: decodeURIComponent(match[1]), service: decodeURIComponent(match[2]) };
    } catch (_) {
      return null;
    }
  }

  function start() {
    state.selected = readSelection();
    window.addEventListener('hashchange', () => {
      state.selected = readSelection();
      render();
      if (state.selected) $('instances-title').focus();
    });
    $('instances-title').tabIndex = -1;
    $('service-filter').addEventListener('input', (event) => {
      state.filter = event.target.value.trim().toLowerCase();
      invalidate();
    });
    render();
    connect();
    refreshCluster();
    setInterval(refreshLeases, LEASE_POLL_MS);
    setInterval(tickTtls, TTL_TICK_MS);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
