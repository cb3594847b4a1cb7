"""PostgreSQL side: table definitions, migrations, upserts, backfill SQL."""
