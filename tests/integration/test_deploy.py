"""deploy/: every manifest parses, Prometheus accepts the config and the alert rules (and their unit
tests pass), and the dashboard and alerts only query metrics that sinks/metrics.py (the workers)
and edge/metrics.py (the tracking edge) define."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
#: The Prometheus dashboards; bi.json queries ClickHouse (tests/unit/deploy/test_bi_dashboard.py).
DASHBOARDS = sorted(p for p in (DEPLOY / "grafana" / "dashboards").glob("*.json") if p.name != "bi.json")
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
METRIC_NAME = re.compile(r"attribution_[a-z_]+")
#: Series names prometheus_client exposes per metric type, beyond the family's own name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
}


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's `prometheus` package, installed by the script when missing."""
    done = subprocess.run(
        [str(REPO / "scripts" / "ensure-promtool.sh")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"scripts/ensure-promtool.sh failed:\n{done.stdout}{done.stderr}"
    path = shutil.which("promtool")
    assert path, "promtool is still not on PATH"
    return path


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def known_series_names() -> set[str]:
    import prometheus_client

    import edge.metrics  # noqa: F401 - the tracking edge's (attribution_edge_*)
    import sinks.metrics  # noqa: F401 - registers the collectors

    names: set[str] = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("attribution_"):
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def panel_expressions(dashboard: dict[str, Any]) -> list[str]:
    def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for panel in items:
            found.append(panel)
            found += panels(panel.get("panels", []))  # collapsed rows nest their panels
        return found

    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_yaml_file_under_deploy_parses() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES
    for path in YAML_FILES:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, f"{path} is empty"
        assert all(isinstance(d, dict) for d in documents), path


def test_every_dashboard_is_json_with_panels_that_query_prometheus() -> None:
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        assert panel_expressions(dashboard), f"{path.name} has no queries"


def test_compose_and_k8s_settings_are_accepted_by_the_worker_config() -> None:
    """A misspelt env var or a bad value in deploy/ would stop the worker at start-up."""
    from schemas.config import Config

    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    compose_env = compose_environment(compose["x-attribution"]["environment"])
    assert compose["services"]["worker"]["environment"] == compose["x-attribution"]["environment"]
    # More than one worker: the group shares the partitions (README, "Scaling out").
    assert compose["services"]["worker"]["deploy"]["replicas"] >= 2
    k8s_env = dict(configmap["data"], CLICKHOUSE_URL="clickhouse://u:p@clickhouse:9000/attribution")
    for env in (compose_env, k8s_env):
        config = Config(**env)
        assert config.metrics_port == 9102
        assert str(config.state_dir) == "/var/lib/attribution"


def compose_environment(environment: dict[str, Any]) -> dict[str, str]:
    """Compose's `${VAR:-default}` as its default and `${VAR:?message}` (required) as a value."""
    interpolation = re.compile(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)\}")
    # A `*_FILE` naming a compose secret exists only in the container: its name is checked by
    # test_the_secret_files_the_worker_reads_are_compose_secrets, not read here.
    return {key: interpolation.sub(lambda m: m[2] if m[2] is not None else f"set-{m[1].lower()}",
                                   str(value))
            for key, value in environment.items()
            if not (key.endswith("_FILE") and str(value).startswith("/run/secrets/"))}


def test_the_secret_files_the_worker_reads_are_compose_secrets() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in (service.get("secrets") or []), (name, key)
                assert secret in compose["secrets"], (name, key)


def test_no_password_has_a_default_anywhere_in_deploy() -> None:
    """Every password is required: compose's `${VAR:?...}`, a compose secret or a k8s Secret."""
    compose_text = (DEPLOY / "compose" / "docker-compose.yml").read_text()
    variables = re.findall(r"\$\{(\w+)(:-|:\?|-|\?)?", compose_text)
    secret_variables = {name for name, _ in variables if "PASSWORD" in name}
    assert secret_variables >= {"CLICKHOUSE_ADMIN_PASSWORD", "CLICKHOUSE_WORKER_PASSWORD",
                                "CLICKHOUSE_BI_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    assert all(op == ":?" for name, op in variables if "PASSWORD" in name), variables
    compose = yaml.safe_load(compose_text)
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key and not key.endswith("__FILE"):
                assert str(value).startswith("${") and ":?" in str(value), (key, value)
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            assert document.get("kind") != "Secret", f"{path.name} commits a Secret"
            assert "password" not in json.dumps(document.get("data", {})).lower(), path.name


def test_each_process_reaches_clickhouse_as_a_user_with_only_what_it_needs() -> None:
    from schemas.config import Config

    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    users = {}
    for name in ("migrate", "worker", "report"):
        env: dict[str, Any] = compose_environment(compose["services"][name]["environment"])
        users[name] = Config(**env).clickhouse.user
    assert users == {"migrate": "attribution_admin", "worker": "attribution_worker",
                     "report": "attribution_bi"}
    clickhouse = compose["services"]["clickhouse"]
    assert not any(key.startswith("CLICKHOUSE_") for key in clickhouse.get("environment") or {})
    assert set(clickhouse["secrets"]) == {f"clickhouse_{u}_password" for u in ("admin", "worker", "bi")}
    secrets = {}
    for name in ("statefulset", "migrate-job"):
        manifest = yaml.safe_load((DEPLOY / "k8s" / f"{name}.yaml").read_text())
        container = manifest["spec"]["template"]["spec"]["containers"][0]
        (url,) = [e for e in container["env"] if e["name"] == "CLICKHOUSE_URL"]
        secrets[name] = url["valueFrom"]["secretKeyRef"]["name"]
    assert secrets == {"statefulset": "attribution-clickhouse-worker",
                       "migrate-job": "attribution-clickhouse-admin"}


def test_the_compose_clickhouse_users_remove_default_and_hold_least_privilege(tmp_path: Path) -> None:
    """deploy/compose/clickhouse-users.sh, run with its paths moved under tmp_path."""
    passwords = {"admin": "a-admin-pw", "worker": "w-worker-pw", "bi": "b-bi-pw"}
    (tmp_path / "secrets").mkdir()
    (tmp_path / "users.d").mkdir()
    for user, password in passwords.items():
        (tmp_path / "secrets" / f"clickhouse_{user}_password").write_text(password + "\n")
    script = (DEPLOY / "compose" / "clickhouse-users.sh").read_text()
    assert 'exec /entrypoint.sh "$@"' in script
    moved = (script.replace("/run/secrets/", f"{tmp_path}/secrets/")
             .replace("/etc/clickhouse-server/users.d/", f"{tmp_path}/users.d/")
             .replace('exec /entrypoint.sh "$@"', "exit 0"))
    done = subprocess.run(["bash", "-c", moved], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    users = ElementTree.parse(tmp_path / "users.d" / "zz-attribution-users.xml").getroot().find("users")
    assert users is not None and users.find("default").get("remove") == "remove"  # type: ignore[union-attr]
    for user, password in passwords.items():
        entry = users.find(f"attribution_{user}")
        assert entry is not None
        assert entry.findtext("password_sha256_hex") == hashlib.sha256(password.encode()).hexdigest()
        assert entry.findtext("access_management", "0") == ("1" if user == "admin" else "0")
    assert users.findtext("attribution_worker/grants/query") == "GRANT SELECT, INSERT ON attribution.*"
    assert users.findtext("attribution_bi/grants/query") == "GRANT SELECT ON attribution.*"
    assert users.findtext("attribution_bi/profile") == "attribution_readonly"
    (tmp_path / "secrets" / "clickhouse_bi_password").write_text("")
    refused = subprocess.run(["bash", "-c", moved], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "clickhouse_bi_password is missing or empty" in refused.stderr


def test_prometheus_accepts_the_config_and_its_rule_files(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert "1 rule files found" in output


def test_prometheus_accepts_the_alert_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", "deploy/prometheus/alerts.yml")


def test_every_alert_fires_in_its_unit_test(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", "deploy/prometheus/alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROMETHEUS / "alerts.yml").read_text()))
    assert defined and tested == defined


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's $__rate_interval filled in, as a recording rule promtool parses."""
    rules = []
    for path in DASHBOARDS:
        for n, expr in enumerate(panel_expressions(json.loads(path.read_text()))):
            rules.append({"record": f"dashboard:{path.stem}:query_{n}",
                          "expr": expr.replace("$__rate_interval", "1m")})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(rule_file))


def test_dashboards_and_alerts_only_query_metrics_the_worker_exports() -> None:
    known = known_series_names()
    assert "attribution_consumer_lag" in known and "attribution_dead_letters_total" in known
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in panel_expressions(json.loads(path.read_text())):
            used.setdefault(path.name, set()).update(METRIC_NAME.findall(expr))
    for expr in alert_expressions():
        used.setdefault("alerts.yml", set()).update(METRIC_NAME.findall(expr))
    unknown = {where: sorted(names - known) for where, names in used.items() if names - known}
    assert not unknown, f"metrics not defined in sinks/metrics.py or edge/metrics.py: {unknown}"


def test_kustomize_renders_the_k8s_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional: the YAML itself is checked above)")
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(done.stdout) if d}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "Job"} <= kinds
