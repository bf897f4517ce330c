-- Contract §7 tables. Every table is a ReplacingMergeTree keyed by the logical row's id, so that
-- `SELECT ... FINAL` shows each row once whatever retries, restarts or replays inserted it again:
-- the pipeline is at-least-once and every row it writes is deterministic for its id.
-- Written for ClickHouse 18.16 (Debian) and current releases alike: no LowCardinality, no TTL,
-- no Nullable keys, explicit casts in UNION ALL.

CREATE TABLE IF NOT EXISTS {db}.clicks
(
    event_id      String,
    ts            DateTime('UTC'),
    visitor_id    String,
    session_id    String,
    affiliate_id  String,
    channel       String,
    share_id      String,
    referrer_host String,
    inserted_at   DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY event_id;

CREATE TABLE IF NOT EXISTS {db}.shares
(
    event_id     String,
    ts           DateTime('UTC'),
    affiliate_id String,
    share_id     String,
    channel      String,
    url          String,
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY event_id;

-- One row per order (attributed or not: conversion reporting needs both). `version` lets a later
-- decision (e.g. a review) supersede the row; the pipeline itself writes version 0 once.
CREATE TABLE IF NOT EXISTS {db}.attributed_orders
(
    order_id       String,
    ts             DateTime('UTC'),
    visitor_id     String,
    customer_id    String,
    affiliate_id   String,
    program_id     String,
    method         String,
    click_event_id String,
    channel        String,
    discount_code  String,
    total          Decimal(18, 2),
    currency       String,
    commission     Decimal(18, 2),
    flags          Array(String),
    status         String,
    version        UInt64,
    inserted_at    DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(ts)
ORDER BY order_id;

-- The append-only ledger. `channel` and `order_ts` repeat the order's so reports need no join.
CREATE TABLE IF NOT EXISTS {db}.commission_facts
(
    fact_id      String,
    order_id     String,
    affiliate_id String,
    program_id   String,
    kind         String,
    amount       Decimal(18, 2),
    currency     String,
    status       String,
    ts           DateTime('UTC'),
    channel      String,
    order_ts     DateTime('UTC'),
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(order_ts)
ORDER BY (order_id, fact_id);

CREATE TABLE IF NOT EXISTS {db}.abuse_flags
(
    order_id      String,
    ts            DateTime('UTC'),
    affiliate_id  String,
    discount_code String,
    reason        String,
    severity      String,
    detail        String,
    inserted_at   DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (order_id, reason);

-- Per affiliate x channel x day (x currency for money). A plain view over FINAL, not a
-- materialized one: summing materialized views would count a replayed insert twice.
CREATE VIEW IF NOT EXISTS {db}.affiliate_channel_daily AS
SELECT
    day,
    affiliate_id,
    channel,
    currency,
    sum(clicks)         AS clicks,
    sum(shares)         AS shares,
    sum(orders)         AS orders,
    sum(revenue)        AS revenue,
    sum(net_commission) AS net_commission
FROM
(
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(count()) AS clicks, toUInt64(0) AS shares, toUInt64(0) AS orders,
           toDecimal128(0, 2) AS revenue, toDecimal128(0, 2) AS net_commission
    FROM {db}.clicks FINAL
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(0) AS clicks, toUInt64(count()) AS shares, toUInt64(0) AS orders,
           toDecimal128(0, 2) AS revenue, toDecimal128(0, 2) AS net_commission
    FROM {db}.shares FINAL
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks, toUInt64(0) AS shares, toUInt64(count()) AS orders,
           toDecimal128(sum(total), 2) AS revenue, toDecimal128(0, 2) AS net_commission
    FROM {db}.attributed_orders FINAL
    GROUP BY day, affiliate_id, channel, currency
    UNION ALL
    SELECT toDate(order_ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks, toUInt64(0) AS shares, toUInt64(0) AS orders,
           toDecimal128(0, 2) AS revenue, toDecimal128(sum(amount), 2) AS net_commission
    FROM {db}.commission_facts FINAL
    GROUP BY day, affiliate_id, channel, currency
)
GROUP BY day, affiliate_id, channel, currency;
