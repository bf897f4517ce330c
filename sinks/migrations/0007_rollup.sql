-- Issue 14 item 3: the rollup `report` and dashboards read, one row per day x affiliate x channel
-- x currency (sinks/rollup.py says how it is kept). It is never summed into: each refresh
-- recomputes it from the sources with FINAL and swaps it in whole (current servers) or a month
-- at a time (18.16), so a replayed row is counted once. Clicks and shares carry no currency: they
-- are on currency '' rows, as in the view `affiliate_channel_daily`, which stays as it was (the
-- always-exact live view). Money goes by the order's day; pending / approved / held as
-- `attribution report` defines them.

CREATE TABLE IF NOT EXISTS {db}.affiliate_channel_daily_totals
(
    day            Date,
    affiliate_id   String,
    channel        LowCardinality(String),
    currency       LowCardinality(String),
    clicks         UInt64,
    shares         UInt64,
    orders         UInt64,
    revenue        Decimal(18, 2),
    net_commission Decimal(18, 2),
    pending        Decimal(18, 2),
    approved       Decimal(18, 2),
    held           Decimal(18, 2)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (affiliate_id, day, channel, currency);

-- Rebuilds (sinks.rollup.refresh): a row per rebuild, with the server time it began and the
-- fingerprint of the sources it read (per table, the highest block number of the month's parts);
-- a month whose sources' fingerprint differs now is rebuilt again. Month 0: refreshes of the
-- refreshable view that a command asked for.
CREATE TABLE IF NOT EXISTS {db}.rollup_refreshes
(
    month       UInt32,
    started_at  DateTime('UTC'),
    sources     String DEFAULT '',
    finished_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(started_at)
ORDER BY month;

-- Current servers: a refreshable view recomputes the whole rollup every ROLLUP_REFRESH_SECONDS
-- (`db migrate` keeps the period equal to the setting) and replaces it atomically. Days past the
-- click horizon are closed: raw clicks expire after CLICKHOUSE_CLICKS_TTL_DAYS, so for days older
-- than today - TTL + 2 the clicks are the rollup's own (read before the swap); everything else,
-- their money included, is recomputed. Keep this query equal to sinks.rollup.totals_select
-- (a unit test compares them).
-- requires: refreshable_views
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.affiliate_channel_daily_totals_refresh
REFRESH EVERY {rollup_refresh_seconds} SECOND
TO {db}.affiliate_channel_daily_totals
AS
SELECT
    day, affiliate_id, channel, currency,
    sum(clicks_n)   AS clicks,
    sum(shares_n)   AS shares,
    sum(orders_n)   AS orders,
    sum(revenue_d)  AS revenue,
    sum(net_d)      AS net_commission,
    sum(pending_d)  AS pending,
    sum(approved_d) AS approved,
    sum(held_d)     AS held
FROM
(
    SELECT day, affiliate_id, channel, currency,
           toUInt64(clicks) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {db}.affiliate_channel_daily_totals
    WHERE day < if({clicks_ttl_days} = 0, toDate('1970-01-01'), today() - {clicks_ttl_days} + 2) AND clicks > 0
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(count()) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {db}.clicks FINAL
    WHERE toDate(ts) >= if({clicks_ttl_days} = 0, toDate('1970-01-01'), today() - {clicks_ttl_days} + 2)
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(0) AS clicks_n, toUInt64(count()) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {db}.shares FINAL
    
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(count()) AS orders_n,
           toDecimal128(sum(total), 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {db}.attributed_orders FINAL
    
    GROUP BY day, affiliate_id, channel, currency
    UNION ALL
    SELECT toDate(order_ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(order_net, 2) AS net_d,
           toDecimal128(if(order_state = 'pending', order_net, toDecimal128(0, 2)), 2) AS pending_d,
           toDecimal128(if(order_state = 'approved', order_net, toDecimal128(0, 2)), 2) AS approved_d,
           toDecimal128(if(order_state = 'held', order_net, toDecimal128(0, 2)), 2) AS held_d
    FROM
    (
        SELECT order_id, affiliate_id, channel, currency, order_ts,
               sum(amount) AS order_net,
               if(countIf(kind = 'approval') > 0, 'approved',
                  anyIf(status, kind = 'accrual')) AS order_state
        FROM {db}.commission_facts FINAL
        
        GROUP BY order_id, affiliate_id, channel, currency, order_ts
    )
)
GROUP BY day, affiliate_id, channel, currency;
