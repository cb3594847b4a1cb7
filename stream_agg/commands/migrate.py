"""`stream-agg migrate`: create or upgrade the tables (idempotent)."""

from __future__ import annotations

import sys

import click

from stream_agg.config import ConfigError, load_config, redact_url


@click.command("migrate")
@click.option("--database-url", help="Overrides STREAM_AGG_DATABASE_URL.")
@click.option("--print-sql", is_flag=True, help="Print the schema as plain SQL and exit.")
def command(database_url: str | None, print_sql: bool) -> None:
    """Create or upgrade metrics_aggregates, traces, spans and the stream's state tables."""
    from stream_agg.store.schema import LATEST, SchemaTooNewError, ddl_sql, migrate

    if print_sql:
        click.echo(ddl_sql(), nl=False)
        return
    try:
        config = load_config(database_url=database_url)
        applied = migrate(config.database_url)
    except (ConfigError, SchemaTooNewError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - one clear line for operators
        from stream_agg.store.db import describe_db_error

        click.echo(f"error: cannot migrate {redact_url(config.database_url)}: {describe_db_error(exc)}", err=True)
        sys.exit(2)
    if applied:
        click.echo(f"migrated to schema version {LATEST} (applied {', '.join(map(str, applied))})")
    else:
        click.echo(f"schema already at version {LATEST}; nothing to do")
