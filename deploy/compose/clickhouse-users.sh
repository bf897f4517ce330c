#!/bin/bash
# Entry point of the compose `clickhouse` service: writes the attribution users into users.d from
# the compose secrets, then runs the image's own entry point. At every start, so a changed secret
# takes effect on restart; a password is written only as its SHA-256.
#
#   attribution_admin   schema and access management: `attribution db migrate` only
#   attribution_worker  SELECT, INSERT on attribution.* (what `db migrate` grants attribution_writer)
#   attribution_bi      SELECT on attribution.*, readonly (attribution_reader): report, BI tools
#   default             removed: no user without a password, none but the admin manages access
set -euo pipefail

sha256_of_secret() {
    local file="/run/secrets/$1"
    if [[ ! -s "$file" ]]; then
        echo "clickhouse-users.sh: the secret $1 is missing or empty" >&2
        exit 1
    fi
    printf '%s' "$(cat "$file")" | sha256sum | cut -d' ' -f1
}

admin=$(sha256_of_secret clickhouse_admin_password)
worker=$(sha256_of_secret clickhouse_worker_password)
bi=$(sha256_of_secret clickhouse_bi_password)

# "zz-": merged after the image's own users.d files, so `default` stays removed.
umask 077
cat > /etc/clickhouse-server/users.d/zz-attribution-users.xml <<XML
<clickhouse>
    <profiles>
        <attribution_readonly>
            <readonly>1</readonly>
            <!-- Grafana's ClickHouse plugin sets max_execution_time (its query timeout) on every
                 query; readonly 1 refuses any SET unless a constraint allows it. -->
            <constraints>
                <max_execution_time>
                    <changeable_in_readonly/>
                </max_execution_time>
            </constraints>
        </attribution_readonly>
    </profiles>
    <users>
        <default remove="remove"/>
        <attribution_admin>
            <password_sha256_hex>${admin}</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
            <access_management>1</access_management>
        </attribution_admin>
        <attribution_worker>
            <password_sha256_hex>${worker}</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
            <grants><query>GRANT SELECT, INSERT ON attribution.*</query></grants>
        </attribution_worker>
        <attribution_bi>
            <password_sha256_hex>${bi}</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>attribution_readonly</profile>
            <quota>default</quota>
            <grants><query>GRANT SELECT ON attribution.*</query></grants>
        </attribution_bi>
    </users>
</clickhouse>
XML
chown clickhouse:clickhouse /etc/clickhouse-server/users.d/zz-attribution-users.xml 2>/dev/null || true

exec /entrypoint.sh "$@"
