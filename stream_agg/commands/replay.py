"""`stream-agg replay`: rebuild the stream's buckets of a range by re-reading Kafka."""

from __future__ import annotations

import click

from stream_agg.commands.backfill import describe_widening, fail, open_database, parse_range_input, range_options


@click.command("replay")
@range_options
@click.option("--lookback", default="1h", show_default=True,
              help="Start reading at messages stamped this long before START.")
@click.option("--slack", default="1h", show_default=True,
              help="Stop a partition once its message timestamps pass END + this.")
@click.option("--bootstrap", help="Kafka bootstrap servers (overrides STREAM_AGG_KAFKA_BOOTSTRAP).")
@click.option("--topic", help="Source topic (overrides STREAM_AGG_TOPIC).")
@click.option("--group-id", help="Consumer group whose stream state is rewritten (STREAM_AGG_GROUP_ID); "
              "nothing is committed to it.")
def command(start: str, end: str, granularity: str, metrics: tuple[str, ...], yes: bool, database_url: str | None,
            lookback: str, slack: str, bootstrap: str | None, topic: str | None, group_id: str | None) -> None:
    """Re-read [START, END) from the topic, fold it with the stream's core, rewrite those buckets.

    The stream's partials of the replayed buckets are replaced and their rows re-merged
    (source 'stream'; rows written by the backfill stay). Idempotent. Meant for closed
    buckets: a running worker that still holds an open bucket overwrites it at its next flush.
    """
    from stream_agg.ops.backfill import OpsError, coarsest, parse_duration
    from stream_agg.ops.replay import make_consumer, make_replay_plan, run_replay
    from stream_agg.store.db import describe_db_error

    given = parse_range_input(start, end, granularity, metrics, yes, database_url=database_url,
                              kafka_bootstrap=bootstrap, topic=topic, group_id=group_id)
    try:
        plan = make_replay_plan(given.registry, given.granularities, given.start, given.end,
                                parse_duration(lookback, "--lookback"), parse_duration(slack, "--slack"))
    except OpsError as exc:
        fail(str(exc))
    config = given.config
    click.echo(describe_widening((given.start, given.end), plan.start, plan.end, coarsest(plan.granularities)))
    open_database(config)
    try:
        consumer = make_consumer(config.kafka_bootstrap)
        if not consumer.partitions_for_topic(config.topic):
            consumer.close()
            raise OpsError(f"topic {config.topic!r} does not exist at {config.kafka_bootstrap}")
    except OpsError as exc:
        fail(str(exc))
    stream = f"{config.group_id}:{config.topic}"
    try:
        result = run_replay(config.kafka_bootstrap, config.topic, stream, config.database_url, plan,
                            consumer_factory=lambda: consumer)
    except OpsError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line for the operator; nothing was committed
        fail(f"replay stopped, nothing written: {type(exc).__name__}: {describe_db_error(exc)}")
    click.echo(result.describe())
