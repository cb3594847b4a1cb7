"""README.md is exercised: its shell blocks run (or parse), and its generated tables are current.

Every ```sh block carries a marker comment on the line above it:

- `<!-- test: run -->`        each command runs, in order, against this test's broker, database
                              and topic (the variables `stream-agg devstack` would export) and
                              must exit 0;
- `<!-- test: background -->` the command starts and keeps running (a worker in "another
                              shell"); it is stopped with SIGTERM at the end and must exit 0;
- `<!-- test: skip: why -->`  not run (runs until Ctrl-C, needs Docker...); every `stream-agg`
                              command in it must still be a real sub-command accepting the
                              flags used.

The settings and metrics tables are generated from `config.SETTINGS` and
`observability.Metrics`; `python tests/integration/test_readme.py` rewrites them in place.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from stream_agg.config import SETTINGS, load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->[ \t]*\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```", re.S | re.M)
GENERATED = re.compile(r"(<!-- generated:(?P<name>\w+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


@dataclass(frozen=True)
class Block:
    marker: str
    body: str

    @property
    def commands(self) -> list[str]:
        """Commands of the block: continuation lines joined, blank and comment-only lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.body)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def shell_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    return [Block((m.group("marker") or "").strip(), m.group("body")) for m in FENCE.finditer(text)
            if m.group("lang") in ("sh", "bash", "shell")]


def settings_table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.env}` | {default} | {s.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def metrics_table() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from stream_agg.observability import Metrics

    rows = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            labels = ", ".join(metric._labelnames) or "-"
            rows.append(f"| `{name}` | {metric._type} | {labels} | {metric._documentation} |")
    return "\n".join(rows) + "\n"


GENERATORS = {"settings": settings_table, "metrics": metrics_table}


def regenerate(text: str) -> str:
    return GENERATED.sub(lambda m: m.group(1) + GENERATORS[m.group("name")]() + m.group(4), text)


def ci_test_command() -> str:
    m = re.search(r'^TEST_COMMAND="([^"]+)"', (ROOT / ".ci" / "run").read_text(), re.M)
    assert m, ".ci/run defines TEST_COMMAND"
    return m.group(1)


# ----------------------------------------------------------------------------- fast checks


def test_generated_tables_are_current():
    text = README.read_text()
    assert {m.group("name") for m in GENERATED.finditer(text)} == set(GENERATORS)
    assert regenerate(text) == text, "run `python tests/integration/test_readme.py` to regenerate the tables"


def test_every_shell_block_is_marked():
    blocks = shell_blocks()
    assert len(blocks) >= 10
    for b in blocks:
        assert b.marker in ("run", "background") or re.fullmatch(r"skip: \S.{8,}", b.marker), (b.marker, b.body)


def test_first_screen_has_the_two_commands():
    """The first two shell blocks: install + demo, then exactly the test command CI runs."""
    first, second = shell_blocks()[:2]
    assert first.commands == ["pip install -e . && stream-agg demo"]
    assert second.commands == [ci_test_command()] == ["python -m pytest -q"]
    head = README.read_text().split("## ", 1)[0]
    assert "pip install -e . && stream-agg demo" in head and "python -m pytest -q" in head


def test_skipped_stream_agg_commands_are_real():
    """Commands not run here still name a real sub-command and only flags it accepts."""
    checked = 0
    for b in shell_blocks():
        if b.marker in ("run", "background"):
            continue
        for command in b.commands:
            for part in command.split("&&"):
                words = shlex.split(part.split("#", 1)[0])
                if not words or words[0] != "stream-agg" or len(words) < 2:
                    continue
                sub = words[1]
                res = subprocess.run([sys.executable, "-m", "stream_agg", sub, "--help"], capture_output=True,
                                     text=True, timeout=60)
                assert res.returncode == 0, (command, res.stderr)
                for flag in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
                    assert re.search(rf"(^|[\s,/]){re.escape(flag)}\b", res.stdout), (command, flag)
                checked += 1
    assert checked >= 3


# ----------------------------------------------------------------------------- running them


def test_readme_commands_run_as_written(broker_bootstrap, database_url, topic, tmp_path, default_metrics_port):
    from worker_support import FAST, wait_caught_up

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    env.update(FAST)  # small group timeouts: the worker joins in seconds (a setting, not a README change)
    env.update({
        # What `stream-agg devstack` exports, plus this test's own topic and group.
        "STREAM_AGG_KAFKA_BOOTSTRAP": broker_bootstrap,
        "STREAM_AGG_DATABASE_URL": database_url,
        "STREAM_AGG_TOPIC": topic,
        "STREAM_AGG_GROUP_ID": f"readme-{topic}",
        "STREAM_AGG_METRICS_PORT": "0",
    })
    config = load_config(env=env)
    background: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    ran: list[str] = []
    try:
        for n, block in enumerate(shell_blocks()):
            if block.marker == "background":
                [command] = block.commands
                log = tmp_path / f"background-{n}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(["bash", "-c", command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=tmp_path)
                background.append((command, proc, log))
                continue
            if block.marker != "run":
                continue
            for command in block.commands:
                res = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                                     timeout=240, cwd=tmp_path)
                assert res.returncode == 0, f"{command}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
                assert (res.stdout + res.stderr).strip(), command
                check_output(command, res.stdout, res.stderr)
                ran.append(command)
                if background and command.startswith("stream-agg produce"):
                    wait_caught_up(config, timeout=120)  # as a reader would: let the worker catch up
    finally:
        for command, proc, log in background:
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=20)
            assert code == 0, f"{command} exited {code}:\n{log.read_text(errors='replace')[-3000:]}"
    names = {shlex.split(c)[1] for c in ran if c.startswith("stream-agg ") and len(shlex.split(c)) > 1}
    assert {"--help", "migrate", "produce", "query", "demo", "backfill", "verify", "replay", "reconcile"} <= names


def check_output(command: str, stdout: str, stderr: str) -> None:
    """What the README promises each kind of command prints."""
    words = shlex.split(command)
    sub = words[1] if len(words) > 1 else ""
    if sub == "produce":
        assert re.match(r"sent [\d]+ events", stdout), stdout
    elif sub == "query" and "--format" not in words:
        lines = stdout.splitlines()
        assert lines and lines[0].startswith("window_start") and len(lines) >= 2, stdout + stderr
    elif sub == "query" and "csv" in words:
        assert stdout.startswith("window_start,window_end,") and stdout.count("\n") >= 2, stdout
    elif sub == "verify":
        assert "agree" in stdout, stdout
    elif sub == "demo":
        assert "final · topic" in stdout and "nothing left running" in stdout, stdout[-3000:]
        assert re.search(r"^\s+all\s+[1-9][\d,]*\s", stdout, re.M), stdout[-3000:]


if __name__ == "__main__":
    README.write_text(regenerate(README.read_text()))
    print(f"regenerated the settings and metrics tables in {README}")
