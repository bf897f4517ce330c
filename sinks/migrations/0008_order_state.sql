-- Issue 14 item 4: one row per order (attributed or not) with its current state, so BI never
-- re-implements the ledger's rules. A plain view over FINAL (see 0001): a replay changes nothing.
-- Runs on ClickHouse 18.16 and current releases (checked in tests with both): one JOIN per
-- SELECT, `ANY LEFT JOIN ... USING`, no window functions, no non-equi joins, no Nullable.
--
-- `status`, first rule that matches (README, "Order states"):
--   unattributed  no affiliate
--   rejected      a reject flag, or a reviewer rejected it (a reversal with status rejected)
--   clawed back   a refund after the lock end reversed some of it (status clawback)
--   reversed      refunds before the lock end reversed all of a commission above 0
--   paid          approved, and a payout batch has paid it
--   approved      approved (lock end passed), in no batch yet
--   held          a hold flag and no reviewer released it yet
--   pending       waiting for its lock end (a partial refund leaves it here)
--
-- `payout_id`: §9 counts an approved order in a balance as of a cut-off DATE when its approval's
-- ts < DATE, and a line pays the whole balance (below the minimum it is carried, no line). So the
-- batch that paid the order is the earliest one cut off after the approval day with a line for
-- its affiliate x currency (sinks/payouts.py; a batch without a `payouts` row is not recorded).
-- A batch is owed from the moment it exists: `payout_status` says whether it is marked paid.
--
-- Amounts are the ledger's: `net_commission` = sum of the order's facts; `accrued` the accrual;
-- `reversed` the refunds' reversals (before and after the lock end, negative); `clawed_back` the
-- part after the lock end. A reviewer's rejection reverses the rest: it is in net, not in
-- `reversed`. `reviewer`, `review_decision`, `reviewed_at`: the review that decided (released or
-- rejected); refused and ignored reviews change nothing and are not shown. Times with no event
-- (`approved_at`, `reviewed_at`) are 1970-01-01 00:00:00, not NULL.

CREATE VIEW IF NOT EXISTS {db}.order_states AS
SELECT
    order_id,
    ts,
    affiliate_id,
    program_id,
    channel,
    method,
    discount_code,
    currency,
    total,
    flags,
    multiIf(
        affiliate_id = '',                                        'unattributed',
        accrual_status = 'rejected' OR rejections > 0,            'rejected',
        clawbacks > 0,                                            'clawed back',
        fact_accrued > 0 AND fact_net <= 0,                       'reversed',
        approvals > 0 AND payout_id != '',                        'paid',
        approvals > 0,                                            'approved',
        accrual_status = 'held' AND review_by_decision != 'release', 'held',
        'pending')                                                AS status,
    fact_net                                                      AS net_commission,
    fact_accrued                                                  AS accrued,
    fact_reversed                                                 AS reversed,
    fact_clawed_back                                              AS clawed_back,
    review_by                                                     AS reviewer,
    review_by_decision                                            AS review_decision,
    review_ts                                                     AS reviewed_at,
    approval_ts                                                   AS approved_at,
    -- The approval day goes into the lambdas as an array: 18.16 does not see a column that a
    -- lambda's body names (it drops it from the subquery: "Unknown identifier").
    if(approvals > 0,
       arrayFilter((id, u, d) -> u > d, batch_ids, batch_untils,
                   replicate(toDate(approval_ts), batch_untils))[1],
       '')                                                        AS payout_id,
    if(approvals > 0,
       arrayFilter((s, u, d) -> u > d, batch_statuses, batch_untils,
                   replicate(toDate(approval_ts), batch_untils))[1],
       '')                                                        AS payout_status
FROM
(
    SELECT
        order_id, ts, affiliate_id, program_id, channel, method, discount_code, currency, total,
        flags, accrual_status, rejections, clawbacks, approvals, approval_ts,
        fact_net, fact_accrued, fact_reversed, fact_clawed_back,
        review_by, review_by_decision, review_ts
    FROM
    (
        SELECT
            order_id, ts, affiliate_id, program_id, channel, method, discount_code, currency,
            total, flags,
            -- The accrual's status is the ledger's; the order row's stands in until it lands.
            if(accrual_fact_status = '', order_status, accrual_fact_status) AS accrual_status,
            rejections, clawbacks, approvals, approval_ts,
            fact_net, fact_accrued, fact_reversed, fact_clawed_back
        FROM
        (
            SELECT order_id, ts, affiliate_id, program_id, channel, method, discount_code,
                   currency, total, flags, status AS order_status
            FROM {db}.attributed_orders FINAL
        ) AS orders
        ANY LEFT JOIN
        (
            SELECT
                order_id,
                toDecimal128(sum(amount), 2)                                        AS fact_net,
                toDecimal128(sumIf(amount, kind = 'accrual'), 2)                    AS fact_accrued,
                toDecimal128(sumIf(amount, kind = 'reversal'
                                   AND status IN ('reversed', 'clawback')), 2)      AS fact_reversed,
                toDecimal128(sumIf(amount, status = 'clawback'), 2)                 AS fact_clawed_back,
                anyIf(status, kind = 'accrual')                                     AS accrual_fact_status,
                countIf(kind = 'reversal' AND status = 'rejected')                  AS rejections,
                countIf(status = 'clawback')                                        AS clawbacks,
                countIf(kind = 'approval')                                          AS approvals,
                minIf(ts, kind = 'approval')                                        AS approval_ts
            FROM {db}.commission_facts FINAL
            GROUP BY order_id
        ) AS facts USING order_id
    ) AS ledger
    ANY LEFT JOIN
    (
        SELECT
            order_id,
            argMax(reviewer, ts) AS review_by,
            argMax(decision, ts) AS review_by_decision,
            max(ts)              AS review_ts
        FROM {db}.reviews FINAL
        WHERE outcome IN ('released', 'rejected')
        GROUP BY order_id
    ) AS decided_reviews USING order_id
) AS order_reviews
ANY LEFT JOIN
(
    -- Per affiliate x currency, the recorded batches with a line for it, in cut-off order.
    SELECT
        affiliate_id,
        currency,
        arraySort((id, until_day) -> until_day, groupArray(payout_id), groupArray(until))    AS batch_ids,
        arraySort(groupArray(until))                                                         AS batch_untils,
        arraySort((s, until_day) -> until_day, groupArray(batch_status), groupArray(until))  AS batch_statuses
    FROM
    (
        SELECT payout_id, until, affiliate_id, currency
        FROM {db}.payout_lines FINAL
    ) AS lines
    -- LEFT, then the filter: an ANY INNER JOIN keeps one line per batch on current servers.
    ANY LEFT JOIN
    (
        SELECT payout_id, status AS batch_status
        FROM {db}.payouts FINAL
    ) AS batches USING payout_id
    WHERE batch_status != ''
    GROUP BY affiliate_id, currency
) AS schedule USING (affiliate_id, currency);
