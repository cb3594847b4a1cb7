"""One module per `stream-agg` sub-command; each exposes a click command named `command`."""
