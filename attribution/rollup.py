"""`attribution rollup refresh`: bring the rollup `affiliate_channel_daily_totals` up to date.

On 18.16 it rebuilds the months whose sources changed since their last rebuild (every month with
`--all`); with `--every SECONDS` it does so for ever, as a service (18.16 has no refreshable
views to do it by itself). On current servers it refreshes the rollup's view and waits for it.
`attribution report` refreshes the months it reads by itself; this is for dashboards, which read
the table directly. The work is in sinks/rollup.py; `attribution/cli.py` registers the sub-app.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console

rollup_app = typer.Typer(
    help="The rollup affiliate_channel_daily_totals (per day x affiliate x channel x currency) "
         "that report and dashboards read.",
    no_args_is_help=True,
)

err = Console(stderr=True)


def _brief(error: Exception) -> str:
    """A server error without its stack trace, on one line."""
    return " ".join(str(error).split("Stack trace:")[0].split())


def _cli() -> Any:
    import attribution.cli as cli  # the shared helpers; imported late, cli.py imports this module

    return cli


@rollup_app.command("refresh")
def refresh(
    rebuild_all: bool = typer.Option(
        False, "--all", help="Rebuild every month (18.16), or refresh the view even when no "
                             "source changed (current servers)."),
    every: Optional[float] = typer.Option(
        None, "--every", metavar="SECONDS", min=1.0,
        help="Refresh again every SECONDS until stopped (a service on 18.16). A failed round is "
             "printed and the next one runs."),
) -> None:
    """Recompute the months of the rollup whose sources changed since their last rebuild (18.16),
    or refresh its view (current servers). Prints a line per month rebuilt; exits 1 on failure."""
    from sinks.clickhouse import connect
    from sinks.rollup import format_month, refresh as refresh_rollup, run_every

    cli = _cli()
    config = cli.load_config()
    database = config.clickhouse.database

    def one_round() -> None:
        client = connect(config.clickhouse)

        def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
            return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

        try:
            done = refresh_rollup(execute, database, force=rebuild_all,
                                  progress=lambda line: typer.echo(line))
        finally:
            client.disconnect()
        if done.rebuilt:
            typer.echo(f"rollup up to date: rebuilt {len(done.rebuilt)} months "
                       f"({', '.join(format_month(m) for m in done.rebuilt)})")
        elif not done.view_refreshed:
            typer.echo("rollup up to date: nothing changed since its last refresh")

    if every is None:
        try:
            one_round()
        except Exception as exc:
            raise cli.fail(f"cannot refresh the rollup in {config.clickhouse!r}: {_brief(exc)}") from exc
        return
    try:
        run_every(every, one_round,
                  lambda exc: err.print(f"[red]error:[/] cannot refresh the rollup: {_brief(exc)}"))
    except KeyboardInterrupt:
        err.print("stopped")
