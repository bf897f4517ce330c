-- Issue "discount-code abuse": what a fraud analyst needs per code, and reviewer decisions.
-- Works on ClickHouse 18.16 and current releases (checked in tests with both).

-- The coupon site an order with a code came from (its own referrer, else its visitor's latest
-- click's), and the discount the code gave (optional `discount_amount` of the order event).
ALTER TABLE {db}.attributed_orders ADD COLUMN coupon_site String DEFAULT '';
ALTER TABLE {db}.attributed_orders ADD COLUMN discount_amount Decimal(18, 2) DEFAULT toDecimal64(0, 2);

-- Reviewer decisions on held orders (`attribution review`), with what the ledger did with them.
CREATE TABLE IF NOT EXISTS {db}.reviews
(
    review_id    String,
    order_id     String,
    ts           DateTime('UTC'),
    decision     String,
    reviewer     String,
    note         String,
    affiliate_id String,
    outcome      String,
    inserted_at  DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (order_id, review_id);

-- Per discount code x hour: how the code is being used. A plain view over FINAL (see 0001).
-- `without_owner_click`: orders attributed to the code's owner with no click of the owner's
-- (method `code`); orders whose code did not attribute them (unknown code, inactive owner) count
-- as redemptions but not as attributed ones.
CREATE VIEW IF NOT EXISTS {db}.code_usage_hourly AS
SELECT
    discount_code,
    toStartOfHour(ts)                                   AS hour,
    any(affiliate_id)                                   AS affiliate_id,
    count()                                             AS redemptions,
    uniqExact(customer_id)                              AS distinct_customers,
    countIf(method IN ('code', 'code+click'))           AS attributed_by_code,
    countIf(method = 'code')                            AS without_owner_click,
    countIf(coupon_site != '')                          AS from_coupon_sites,
    countIf(has(flags, 'code_velocity'))                AS velocity_flagged,
    toDecimal128(sum(total), 2)                         AS revenue,
    toDecimal128(sum(discount_amount), 2)               AS discount_given
FROM {db}.attributed_orders FINAL
WHERE discount_code != ''
GROUP BY discount_code, hour;
