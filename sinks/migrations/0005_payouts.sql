-- Contract §9: payout batches and their lines. Runs on ClickHouse 18.16 and current releases
-- (checked in tests with both): no LowCardinality, no TTL, no Nullable.

-- One row per batch. `version` orders its states (0 open, 1 paid), so `FINAL` shows the latest:
-- `payouts mark-paid` inserts the paid row and nothing ever updates one in place.
CREATE TABLE IF NOT EXISTS {db}.payouts
(
    payout_id   String,
    until       Date,
    created_at  DateTime('UTC'),
    status      String,
    reference   String,
    minimum     Decimal(18, 2),
    currency    String,
    version     UInt64,
    inserted_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY payout_id;

-- What a batch pays one affiliate in one currency. Deterministic for the batch's cut-off, so a
-- create that is run again writes the same rows and FINAL shows each once.
CREATE TABLE IF NOT EXISTS {db}.payout_lines
(
    payout_id    String,
    until        Date,
    affiliate_id String,
    currency     String,
    amount       Decimal(18, 2),
    orders       UInt32,
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (payout_id, affiliate_id, currency);
