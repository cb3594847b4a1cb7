-- Generated from stream_agg/store/schema.py by `stream-agg migrate --print-sql`.
-- Apply with psql if you don't use the CLI; `stream-agg migrate` does the same.

CREATE TABLE IF NOT EXISTS metrics_aggregates (
	id BIGSERIAL NOT NULL, 
	bucket_time TIMESTAMP WITH TIME ZONE NOT NULL, 
	granularity TEXT NOT NULL, 
	metric_name TEXT NOT NULL, 
	dimension_type TEXT NOT NULL, 
	dimension_value TEXT NOT NULL, 
	count BIGINT NOT NULL, 
	sum_value DOUBLE PRECISION NOT NULL, 
	min_value DOUBLE PRECISION, 
	max_value DOUBLE PRECISION, 
	avg_value DOUBLE PRECISION, 
	p50_value DOUBLE PRECISION, 
	p95_value DOUBLE PRECISION, 
	p99_value DOUBLE PRECISION, 
	digest BYTEA, 
	source TEXT DEFAULT 'stream' NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT metrics_aggregates_bucket_key UNIQUE (bucket_time, granularity, metric_name, dimension_type, dimension_value), 
	CONSTRAINT metrics_aggregates_granularity_check CHECK (granularity IN ('hour', 'day', 'week')), 
	CONSTRAINT metrics_aggregates_source_check CHECK (source IN ('stream', 'backfill'))
)
 WITH (fillfactor = 70);
CREATE INDEX IF NOT EXISTS metrics_aggregates_dashboard_idx ON metrics_aggregates (metric_name, granularity, dimension_type, dimension_value, bucket_time);

CREATE TABLE IF NOT EXISTS spans (
	trace_id TEXT NOT NULL, 
	span_id TEXT NOT NULL, 
	kind TEXT NOT NULL, 
	model TEXT, 
	duration_ms DOUBLE PRECISION NOT NULL, 
	input_tokens BIGINT, 
	output_tokens BIGINT, 
	status TEXT, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	operation_type TEXT NOT NULL, 
	CONSTRAINT spans_pkey PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_kind_started_at_idx ON spans (kind, started_at);

CREATE TABLE IF NOT EXISTS stream_agg_schema (
	version SERIAL NOT NULL, 
	applied_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (version)
);

CREATE TABLE IF NOT EXISTS stream_cap_cuts (
	bucket_time TIMESTAMP WITH TIME ZONE NOT NULL, 
	granularity TEXT NOT NULL, 
	metric_name TEXT NOT NULL, 
	dimension_type TEXT NOT NULL, 
	cap_hash BIGINT NOT NULL, 
	cap_value TEXT NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	CONSTRAINT stream_cap_cuts_pkey PRIMARY KEY (bucket_time, granularity, metric_name, dimension_type)
);

CREATE TABLE IF NOT EXISTS stream_offsets (
	stream TEXT NOT NULL, 
	partition INTEGER NOT NULL, 
	next_offset BIGINT NOT NULL, 
	max_event_time DOUBLE PRECISION, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	CONSTRAINT stream_offsets_pkey PRIMARY KEY (stream, partition)
);

CREATE TABLE IF NOT EXISTS stream_partial_deltas (
	stream TEXT NOT NULL, 
	granularity TEXT NOT NULL, 
	bucket_time TIMESTAMP WITH TIME ZONE NOT NULL, 
	partition INTEGER NOT NULL, 
	states BYTEA NOT NULL, 
	keys INTEGER NOT NULL, 
	applied_offset BIGINT NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	CONSTRAINT stream_partial_deltas_pkey PRIMARY KEY (stream, granularity, bucket_time, partition, applied_offset)
);

CREATE TABLE IF NOT EXISTS stream_partials (
	stream TEXT NOT NULL, 
	granularity TEXT NOT NULL, 
	bucket_time TIMESTAMP WITH TIME ZONE NOT NULL, 
	partition INTEGER NOT NULL, 
	states BYTEA NOT NULL, 
	keys INTEGER NOT NULL, 
	applied_offset BIGINT NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	CONSTRAINT stream_partials_pkey PRIMARY KEY (stream, granularity, bucket_time, partition)
);

CREATE TABLE IF NOT EXISTS stream_retention (
	stream TEXT NOT NULL, 
	pruned_before DOUBLE PRECISION NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	CONSTRAINT stream_retention_pkey PRIMARY KEY (stream)
);

CREATE TABLE IF NOT EXISTS traces (
	trace_id TEXT NOT NULL, 
	operation_type TEXT NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	duration_ms DOUBLE PRECISION NOT NULL, 
	status TEXT NOT NULL, 
	user_id TEXT, 
	kb_id TEXT, 
	total_tokens BIGINT, 
	source_partition INTEGER, 
	source_offset BIGINT, 
	ingested_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (trace_id)
);
CREATE INDEX IF NOT EXISTS traces_started_at_idx ON traces (started_at);

INSERT INTO stream_agg_schema (version) VALUES (3) ON CONFLICT DO NOTHING;
