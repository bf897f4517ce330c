-- Issue 12 item 8 (personal data): one row per `attribution forget` run, so that an erasure can
-- be shown to have happened without keeping whom it was for. `subject_hash` is the keyed hash
-- (PII_KEY) of the customer id, never the id: whoever holds the key and a customer id can check
-- it; the table alone names nobody. Its rows are never updated or deleted.
-- Works on ClickHouse 18.16 and current releases: plain ReplacingMergeTree (a retried insert of
-- the same run collapses under FINAL), no LowCardinality, no TTL, no Nullable.

CREATE TABLE IF NOT EXISTS {db}.privacy_audit
(
    audit_id       String,
    ts             DateTime('UTC'),
    action         String,
    subject_hash   String,
    tables_touched Array(String),
    table_rows     Array(UInt64),
    rows_affected  UInt64,
    visitors       UInt64,
    orders         UInt64,
    state_records  UInt64,
    requested_by   String,
    outcome        String,
    inserted_at    DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (subject_hash, audit_id);
