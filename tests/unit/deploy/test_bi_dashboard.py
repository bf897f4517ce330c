"""deploy/grafana: the BI dashboard (dashboards/bi.json) and its ClickHouse datasource, as
provisioned by deploy/compose. That its queries run on 18.16 and 26.9 is
tests/integration/test_bi_dashboard_queries.py's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
GRAFANA = DEPLOY / "grafana"
BI_DASHBOARD = GRAFANA / "dashboards" / "bi.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "clickhouse.yml"
PLUGIN = "grafana-clickhouse-datasource"
#: The macros of the plugin (pkg/macros/macros.go) that the dashboard may use: those whose SQL
#: 18.16 runs too ($__timeInterval renders toStartOfInterval, which 18.16 lacks).
PORTABLE_MACROS = {"timeFilter", "dateFilter", "fromTime", "toTime", "interval_s"}
_MACRO = re.compile(r"\$__(\w+)")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(BI_DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def clickhouse_datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCE.read_text(encoding="utf-8"))["datasources"]
    return source  # type: ignore[no-any-return]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, rawSql) of every target of every panel."""
    return [(p["title"], t["rawSql"]) for p in dashboard()["panels"] for t in p["targets"]]


def test_the_dashboard_is_json_with_a_uid_title_and_clickhouse_panels() -> None:
    board = dashboard()
    assert board["uid"] == "attribution-bi" and board["title"]
    assert board["timezone"] == "utc"  # the data's days are UTC days
    assert len(board["panels"]) >= 5
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_every_panel_and_query_uses_the_provisioned_clickhouse_datasource() -> None:
    source = clickhouse_datasource()
    assert (source["type"], source["uid"]) == (PLUGIN, "clickhouse")
    wanted = {"type": source["type"], "uid": source["uid"]}
    for panel in dashboard()["panels"]:
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
            assert target["editorType"] == "sql" and target["rawSql"].strip(), panel["title"]
            # The plugin's query type and the backend's format (0 time series, 1 table) agree
            # with the panel.
            series = panel["type"] == "timeseries"
            assert target["queryType"] == ("timeseries" if series else "table"), panel["title"]
            assert target["format"] == (0 if series else 1), panel["title"]


def test_the_queries_use_only_macros_that_render_portable_sql() -> None:
    for title, sql in panel_queries():
        assert set(_MACRO.findall(sql)) <= PORTABLE_MACROS, title
        # BI connects to the database: tables are named without it, as in the cookbook.
        assert "attribution." not in sql and "{db}" not in sql, title


def test_the_datasource_is_the_read_only_bi_user_with_its_password_from_the_secret() -> None:
    source = clickhouse_datasource()
    data = source["jsonData"]
    assert (data["host"], data["port"], data["protocol"]) == ("clickhouse", 9000, "native")
    assert data["username"] == "attribution_bi" and data["defaultDatabase"] == "attribution"
    assert source["secureJsonData"] == {
        "password": "$__file{/run/secrets/clickhouse_bi_password}"}
    assert source["editable"] is False


def test_compose_gives_grafana_the_plugin_the_secret_and_both_dashboards() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    plugins = grafana["environment"]["GF_INSTALL_PLUGINS"].split(",")
    assert any(p.split()[0] == PLUGIN and len(p.split()) == 2 for p in plugins), \
        "the plugin is installed at a pinned version"
    assert "clickhouse_bi_password" in grafana["secrets"]
    assert "clickhouse_bi_password" in compose()["secrets"]
    assert not any("CLICKHOUSE" in key for key in grafana["environment"]), \
        "the password reaches Grafana as a secret file, not an environment variable"
    volumes = set(grafana["volumes"])
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "attribution.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "clickhouse" in grafana["depends_on"]


def test_the_bi_users_profile_lets_the_plugin_set_its_query_timeout() -> None:
    """The plugin sends max_execution_time with every query; a readonly 1 profile refuses it
    unless a constraint makes it changeable_in_readonly (grafana/clickhouse-datasource#325)."""
    script = (DEPLOY / "compose" / "clickhouse-users.sh").read_text()
    profile = re.search(r"<attribution_readonly>(.*?)</attribution_readonly>", script, re.S)
    assert profile is not None
    assert "<readonly>1</readonly>" in profile[1]
    assert re.search(r"<max_execution_time>\s*<changeable_in_readonly/>\s*</max_execution_time>",
                     profile[1])
