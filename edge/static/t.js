/* Attribution snippet (contract §8): <script src="https://EDGE/t.js" async>. ES2015, no
   dependencies, under 3 KB as served. What it does and why: the docstring of edge/sample_store.py */
(() => {
  'use strict';
  const script = document.currentScript;
  const attr = (name) => (script && script.getAttribute(name)) || '';
  const edge = script ? new URL(script.src).origin : '';
  const query = new URLSearchParams(location.search);
  // An id from a URL or cookie, as the edge writes them: nothing that could end or extend a cookie.
  const valid = (id) => (id && /^[\w-]{1,64}$/.test(id) ? id : '');
  const newId = () =>
    Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => (b + 256).toString(16).slice(1)).join('');
  const cookie = (name) => {
    const found = document.cookie.match('(?:^|; )' + name + '=([^;]*)');
    return found ? decodeURIComponent(found[1]) : '';
  };
  const setCookie = (name, value, maxAge) => {
    document.cookie = name + '=' + encodeURIComponent(value) + '; Path=/; SameSite=Lax' +
      (maxAge ? '; Max-Age=' + maxAge : '') +
      (location.protocol === 'https:' ? '; Secure' : '');
  };
  // A string body is text/plain: a simple CORS request, no preflight. The edge reads it as JSON.
  const send = (events) => {
    const url = edge + '/v1/events';
    const body = JSON.stringify(events);
    try {
      if (navigator.sendBeacon(url, body)) return;
    } catch (e) { /* no beacon: fetch */ }
    fetch(url, { method: 'POST', body, keepalive: true, credentials: 'include' }).catch(() => {});
  };

  // `av` from the edge's /r wins: it is the visitor the click was recorded for.
  const visitor = valid(query.get('av')) || valid(cookie('av')) || newId();
  setCookie('av', visitor, 31536000); // a year, as the edge's own `av`
  const session = valid(cookie('as')) || newId();
  setCookie('as', session, 0);

  // With `aclid`, /r recorded the click already; sending one would count it twice.
  const affiliate = valid(query.get('aff'));
  if (affiliate && !query.get('aclid')) {
    let seen = null;
    try {
      seen = sessionStorage.getItem('av:' + location.href);
      sessionStorage.setItem('av:' + location.href, '1');
    } catch (e) { /* storage blocked: send */ }
    if (!seen) {
      send([{
        type: 'click', visitor_id: visitor, session_id: session, affiliate_id: affiliate,
        channel: query.get('channel') || undefined, share_id: query.get('share') || undefined,
        landing_url: location.origin + location.pathname, referrer: document.referrer || undefined,
      }]);
    }
  }

  window.attribution = {
    visitorId: visitor,
    sessionId: session,
    share(channel, shareId, affiliateId) {
      const sharer = affiliateId || attr('data-affiliate');
      const link = new URL(location.origin + location.pathname);
      link.search = new URLSearchParams({ aff: sharer, channel, share: shareId });
      send([{ type: 'share', affiliate_id: sharer, share_id: shareId, channel, url: link.href }]);
      return link.href;
    },
  };
})();
