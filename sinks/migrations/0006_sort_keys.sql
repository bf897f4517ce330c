-- Issue "finance and BI at scale": the contract tables sorted for the filters BI and reports use
-- (an affiliate, a range of days), with LowCardinality for the few-valued columns.
--
-- Each table keeps its engine and partitioning; its sort key becomes (affiliate_id, day, id). The
-- ids are deterministic, and a row's affiliate and time never change for its id, so a replayed
-- row still meets its twin under the same key and FINAL still shows it once. Unattributed orders
-- (affiliate_id '') sort together at the front.
--
-- A sort key cannot be altered: each table is rebuilt (sinks.migrate.rebuild_table). Stop the
-- workers while this runs. On 18.16 LowCardinality is left out (experimental there), the day is
-- toDate(ts, 'UTC') (DAY_OF: see sinks/migrate.py), and TTLs, which 18.16 lacks, are set after the
-- migrations from settings (sinks.migrate.reconcile).

-- rebuild: clicks
CREATE TABLE {db}.clicks
(
    event_id      String,
    ts            DateTime('UTC'),
    visitor_id    String,
    session_id    String,
    affiliate_id  String,
    channel       LowCardinality(String),
    share_id      String,
    referrer_host String,
    inserted_at   DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, DAY_OF(ts), event_id);

-- rebuild: shares
CREATE TABLE {db}.shares
(
    event_id     String,
    ts           DateTime('UTC'),
    affiliate_id String,
    share_id     String,
    channel      LowCardinality(String),
    url          String,
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, DAY_OF(ts), event_id);

-- rebuild: attributed_orders
CREATE TABLE {db}.attributed_orders
(
    order_id        String,
    ts              DateTime('UTC'),
    visitor_id      String,
    customer_id     String,
    affiliate_id    String,
    program_id      LowCardinality(String),
    method          LowCardinality(String),
    click_event_id  String,
    channel         LowCardinality(String),
    discount_code   String,
    total           Decimal(18, 2),
    currency        LowCardinality(String),
    commission      Decimal(18, 2),
    flags           Array(String),
    status          LowCardinality(String),
    version         UInt64,
    inserted_at     DateTime('UTC') DEFAULT now(),
    coupon_site     String DEFAULT '',
    discount_amount Decimal(18, 2) DEFAULT toDecimal64(0, 2)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, DAY_OF(ts), order_id);

-- Facts sit in their order's month and day: every fact of an order is in one partition, next to
-- each other, so a per-order grouping (report, payouts, statements) reads one affiliate's range.
-- rebuild: commission_facts
CREATE TABLE {db}.commission_facts
(
    fact_id      String,
    order_id     String,
    affiliate_id String,
    program_id   LowCardinality(String),
    kind         LowCardinality(String),
    amount       Decimal(18, 2),
    currency     LowCardinality(String),
    status       LowCardinality(String),
    ts           DateTime('UTC'),
    channel      LowCardinality(String),
    order_ts     DateTime('UTC'),
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(order_ts)
ORDER BY (affiliate_id, DAY_OF(order_ts), order_id, fact_id);

-- rebuild: abuse_flags
CREATE TABLE {db}.abuse_flags
(
    order_id      String,
    ts            DateTime('UTC'),
    affiliate_id  String,
    discount_code String,
    reason        LowCardinality(String),
    severity      LowCardinality(String),
    detail        String,
    inserted_at   DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (affiliate_id, DAY_OF(ts), order_id, reason);
