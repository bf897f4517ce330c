"""The `attribution` console script as an operator runs it."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from tests_support import REFERENCE_FILE_TEXT

pytestmark = pytest.mark.integration

COMMANDS = [[], ["stack"], ["db"], ["stack", "up"], ["stack", "down"], ["stack", "status"],
            ["db", "migrate"], ["load-reference"], ["produce"], ["worker"], ["report"], ["demo"],
            ["codes"], ["review"], ["stack", "env"], ["forget"], ["edge"]]


def attribution(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attribution", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "attribution")
def test_every_command_explains_itself_with_help(command):
    result = subprocess.run([sys.executable, "-m", "attribution", *command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_migrate_twice_produce_worker_and_report_in_json(isolated, tmp_path):
    env = isolated.env
    first = attribution(env, "db", "migrate")
    second = attribution(env, "db", "migrate")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "up to date" in second.stdout

    reference = tmp_path / "reference.json"
    reference.write_text(REFERENCE_FILE_TEXT)
    loaded = attribution(env, "load-reference", str(reference))
    assert loaded.returncode == 0, loaded.stderr
    assert "1 programs, 1 affiliates" in loaded.stdout

    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"event_id":"c1","type":"click","ts":"2026-11-02T10:00:00Z","visitor_id":"v1",'
        '"session_id":"s1","affiliate_id":"sally","channel":"email"}\n'
        '{"event_id":"o1","type":"order","ts":"2026-11-02T11:00:00Z","order_id":"o1",'
        '"visitor_id":"v1","customer_id":"c9","currency":"EUR","total":"200.00"}\n'
        'not json\n'
        '{"type":"teleport"}\n'
    )
    produced = attribution(env, "produce", str(events))
    assert produced.returncode == 0, produced.stderr
    assert "total sent 2, skipped 2" in produced.stdout
    assert "not_json" in produced.stdout and "unknown_type" in produced.stdout

    isolated.worker().start()
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL", lambda n: n == 1)
    report = attribution(env, "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    rows = orjson.loads(report.stdout)
    assert rows == [{
        "affiliate_id": "sally", "channel": "email", "currency": "EUR", "clicks": 1, "shares": 0,
        "orders": 1, "conversion_rate": "1.0000", "revenue": "200.00", "net_commission": "20.00",
        "pending": "20.00", "approved": "0.00", "held": "0.00",
    }]


def test_a_bad_reference_file_is_rejected_with_the_path_of_the_problem(isolated, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(REFERENCE_FILE_TEXT.replace('"percent"', '"bogus"'))
    result = attribution(isolated.env, "load-reference", str(bad))
    assert result.returncode == 2
    assert "programs[0].commission" in result.stderr.replace("\n", "")


def test_demo_runs_end_to_end_and_codes_names_the_planted_leak_first(isolated):
    """`attribution demo` on a small day; then `attribution codes` on its data (issue 4)."""
    demo = attribution(isolated.env, "demo", "--visitors", "3000", "--timeout", "240")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Affiliates by channel" in demo.stdout
    codes = attribution(isolated.env, "codes", "--format", "json")
    assert codes.returncode == 0, codes.stderr
    leaked = orjson.loads(codes.stdout)
    # The generator leaks aff-002's code to a coupon site: 40 strangers in 30 minutes.
    assert leaked[0]["discount_code"] == "AFF002SAVE" and leaked[0]["affiliate_id"] == "aff-002"
    assert int(leaked[0]["velocity_flagged"]) > 0 and leaked[0]["coupon_sites"] == "retailmenot.com"


#: The console script with topic creation switched off, so that its sends meet topics the broker
#: does not have (it runs with auto-create off).
WITHOUT_TOPIC_CREATION = (
    "import sys, streams.topics\n"
    "streams.topics.ensure_topics = lambda config, progress=None: []\n"
    "from attribution.cli import main\n"
    "sys.argv[0] = 'attribution'\n"
    "main()\n"
)


def test_commands_exit_non_zero_naming_the_count_when_the_broker_does_not_acknowledge(
    stack, tmp_path
):
    """Contract §1: load-reference, produce and review, against topics that do not exist."""
    import os
    import time
    import uuid

    env = dict(os.environ, KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
               TOPIC_PREFIX=f"missing{uuid.uuid4().hex[:8]}.")
    events = tmp_path / "events.jsonl"
    events.write_text("".join(
        f'{{"event_id":"c{n}","type":"click","ts":"2026-11-02T10:00:00Z","visitor_id":"v{n}",'
        f'"session_id":"s","affiliate_id":"sally"}}\n' for n in range(3)
    ) + "not json\n")
    programs_only = tmp_path / "programs.json"
    programs_only.write_text('{"programs": [{"program_id": "p", "kind": "affiliate",'
                             ' "commission": {"type": "percent", "rate": "0.10"}}]}')
    commands = {
        "produce": (["produce", str(events)], "3 of 3 records"),
        "produce --batch": (["produce", str(events), "--batch", "2"],
                            "2 of 2 records were not acknowledged by the broker (3 of 3 events)"),
        "load-reference": (["load-reference", str(programs_only)], "1 of 1 records"),
        "review": (["review", "o1", "--release", "--reviewer", "ann"], "1 of 1 records"),
    }
    started = time.monotonic()
    running = {name: subprocess.Popen([sys.executable, "-c", WITHOUT_TOPIC_CREATION, *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
               for name, (args, _) in commands.items()}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        message = stderr.replace("\n", "")
        assert process.returncode == 1, f"{name}: {stdout}{stderr}"
        assert f"error: {commands[name][1]}" in message, f"{name}: {stderr}"
        assert "not acknowledged by the broker" in message
        assert "published" not in stdout, name  # it never claims what did not happen
    assert time.monotonic() - started < 60  # a missing topic costs max_block_ms (10 s), not 60 s


def test_stack_env_points_a_shell_at_the_plaintext_listener_and_clears_the_secured_settings(
    tmp_path,
):
    import os
    import shlex

    env = dict(os.environ, ATTRIBUTION_STACK_DIR=str(tmp_path))
    printed = subprocess.run([sys.executable, "-m", "attribution", "stack", "env"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                   for line in printed.stdout.splitlines())
    assert exports["KAFKA_BOOTSTRAP"] == "127.0.0.1:9092"
    assert exports["KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert exports["CLICKHOUSE_URL"].startswith("clickhouse://default@127.0.0.1:9000/")
    assert all(exports[name] == "" for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                                                 "KAFKA_SASL_PASSWORD_FILE", "KAFKA_SSL_CAFILE"))

    unsecured = subprocess.run([sys.executable, "-m", "attribution", "stack", "env",
                                "--principal", "worker"], env=env, capture_output=True,
                               text=True, timeout=60)
    assert unsecured.returncode == 1
    assert "stack up --secure" in unsecured.stderr.replace("\n", "")
    unknown = subprocess.run([sys.executable, "-m", "attribution", "stack", "env",
                              "--principal", "root"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 2
