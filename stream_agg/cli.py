"""`stream-agg` entry point: collects the sub-commands of `stream_agg.commands`."""

from __future__ import annotations

import importlib
import logging

import click

# Sub-command modules, each with a click command `command`.
COMMANDS = (
    "migrate",
    "devstack",
    "produce",
    "worker",
    "backfill",
    "verify",
    "replay",
    "reconcile",
    "query",
    "demo",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="STREAM_AGG_LOG_LEVEL", default="INFO", show_default=True)
def cli(log_level: str) -> None:
    """Streaming metrics aggregator for LLM-application traces."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiokafka at DEBUG costs ~8% of throughput and floods logs; keep it at WARNING.
    for noisy in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


for _name in COMMANDS:
    cli.add_command(importlib.import_module(f"stream_agg.commands.{_name}").command)


def main() -> None:
    cli(prog_name="stream-agg")


if __name__ == "__main__":
    main()
