"""The compose stack in docker/ and its Grafana dashboard, checked without Docker.

Docker is not available on these machines: nothing here builds an image or starts a container.
What is checked: compose.yaml parses and validates against the Compose Specification's JSON
schema (docker/schema/compose-spec.json, vendored; validated offline with fastjsonschema),
its references (services, env files, mounted files, Dockerfiles and their COPY sources) exist,
no password is written in it, the commands its pyembed services run work here (through the
image's entrypoint script), the metrics healthcheck passes against `pyembed metrics serve`, and
every metric the dashboard queries is exported by `pyembed metrics serve`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastjsonschema
import pytest
import yaml

import pyembed
from pyembed.localdb import LocalCluster
from tests.conftest import REPO, Database
from tests.helpers import free_port, scrape_metrics

DOCKER = REPO / "docker"
COMPOSE_TEXT = (DOCKER / "compose.yaml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DASHBOARD: dict[str, Any] = json.loads((DOCKER / "grafana" / "pyembed.json").read_text())
VENV_BIN = Path(sys.executable).parent
FAKE = "fake/fake-hash@1:384"
PYEMBED_SERVICES = ("install", "worker", "metrics")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without PYEMBED_* and with the venv's `pyembed` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEMBED_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _run(argv: list[str], extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=_env(extra), cwd=REPO,
                          timeout=120)


# -- compose.yaml --------------------------------------------------------------------------

def test_compose_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads((DOCKER / "schema" / "compose-spec.json").read_text())
    validate = fastjsonschema.compile(schema)
    validate(COMPOSE)
    # fastjsonschema knows draft-07, not 2020-12's unevaluatedProperties, which is how the
    # schema closes a service: check the keys of every service against its definitions here.
    defs = schema["$defs"]
    allowed = set(defs["service"].get("properties", {}))
    for part in defs["service"]["allOf"]:
        allowed |= set(defs[part["$ref"].rsplit("/", 1)[1]].get("properties", {}))
    for name, service in SERVICES.items():
        unknown = {k for k in service if k not in allowed and not k.startswith("x-")}
        assert not unknown, f"service {name}: keys not in the Compose spec: {unknown}"
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validate({"services": {"w": {"image": "x", "depends_on": {"db": {"condition": "up"}}}}})


def test_every_service_has_an_image_or_a_build_and_its_references_exist() -> None:
    assert {"db", "install", "worker", "metrics", "replica", "prometheus", "grafana"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, name  # the Dockerfiles COPY repository paths
            assert (context / build["dockerfile"]).is_file(), name
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on undefined service {dep}"
            assert set(SERVICES[dep].get("profiles", [])) <= set(service.get("profiles", [])), (
                f"{name} depends on {dep}, which is not started in all of {name}'s profiles")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: undeclared volume {source}"


def test_the_stack_is_wired_as_documented() -> None:
    worker, metrics, install = SERVICES["worker"], SERVICES["metrics"], SERVICES["install"]
    assert worker["restart"] == "on-failure" and worker["stop_signal"] == "SIGTERM"
    assert worker["stop_grace_period"] and worker["init"] is True  # signals reach pyembed
    assert "--forever" in worker["command"]  # a drained queue is not an exit
    assert install["command"] == ["pyembed", "install"] and install["restart"] == "no"
    for service in (worker, metrics):
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        assert service["depends_on"]["install"]["condition"] == "service_completed_successfully"
    assert install["depends_on"]["db"]["condition"] == "service_healthy"
    assert metrics["command"][:5] == ["pyembed", "metrics", "serve", "--port", "9187"]
    assert "0.0.0.0" in metrics["command"]  # reachable from prometheus, not just loopback
    for name in ("db", "metrics", "replica"):
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD", name
    assert "9187/metrics" in " ".join(metrics["healthcheck"]["test"])
    assert SERVICES["replica"]["profiles"] == ["replica"]
    assert SERVICES["replica"]["entrypoint"] == ["pyembed-replica-entrypoint"]
    assert "pg_basebackup" in (DOCKER / "replica-entrypoint.sh").read_text()
    assert " -R " in (DOCKER / "replica-entrypoint.sh").read_text()
    assert SERVICES["prometheus"]["profiles"] == SERVICES["grafana"]["profiles"] == ["monitoring"]
    assert "metrics:9187" in (DOCKER / "prometheus.yml").read_text()
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["metrics:9187"]
    for sub in ("datasources/prometheus.yaml", "dashboards/pyembed.yaml"):
        assert yaml.safe_load((DOCKER / "grafana" / "provisioning" / sub).read_text())


@pytest.mark.parametrize("service", ["db", "replica"])
def test_the_database_is_healthy_only_once_it_listens_on_tcp(
        service: str, cluster: LocalCluster, tmp_path: Path) -> None:
    """`install` starts when `db` is healthy, and connects over TCP. pg_isready without a host
    asks the Unix socket, which the image's first start serves (the server that runs the
    initdb scripts, listen_addresses='') while nothing listens on TCP: `install` (restart: no)
    then failed with connection refused, and `worker` and `metrics`, which wait for it, never
    started, on a fresh volume only. The check now asks 127.0.0.1. Run here, PGHOST and PGPORT
    standing for the image's defaults: on a port served by a socket alone (a link to the test
    cluster's socket under a port nothing listens on) it fails; on the cluster's port, which
    listens on 127.0.0.1, it passes."""
    from pyembed.localdb import find_bindir

    argv = SERVICES[service]["healthcheck"]["test"]
    assert argv[0] == "CMD" and argv[1] == "pg_isready"
    pg_isready = [str(Path(find_bindir()) / "pg_isready"), *argv[2:]]
    port = cluster.state().port
    socket_only = free_port()
    (tmp_path / f".s.PGSQL.{socket_only}").symlink_to(cluster.socket_dir / f".s.PGSQL.{port}")
    for served, ready in ((socket_only, False), (port, True)):
        env = _env({"PGHOST": str(tmp_path), "PGPORT": str(served)})
        out = subprocess.run(pg_isready, env=env, capture_output=True, text=True, timeout=60)
        assert (out.returncode == 0) is ready, (served, out.stdout)
    # The link is a server: the same pg_isready without a host is ready on it.
    env = _env({"PGHOST": str(tmp_path), "PGPORT": str(socket_only)})
    assert subprocess.run(pg_isready[:1], env=env, capture_output=True, timeout=60).returncode == 0


def test_env_files_and_secrets_exist_or_are_documented() -> None:
    readme = (REPO / "README.md").read_text()
    example = (DOCKER / "env.example").read_text()
    defined = dict(line.split("=", 1) for line in example.splitlines()
                   if line and not line.startswith("#"))
    for name, service in SERVICES.items():
        for env_file in service.get("env_file", []):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            if (DOCKER / path).exists() and path != "pyembed.env":
                continue
            # the real env file holds passwords: git-ignored, made from env.example as documented
            assert path == "pyembed.env", f"{name}: env file {path} is neither shipped nor documented"
            assert f"cp docker/env.example docker/{path}" in readme
            assert path in (DOCKER / ".gitignore").read_text().split()
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in COMPOSE.get("secrets", {}), f"{name}: undefined secret {source}"
    for secret in COMPOSE.get("secrets", {}).values():
        assert (DOCKER / secret["file"]).exists() or secret["file"] in readme
    for var in ("POSTGRES_PASSWORD", "PYEMBED_APP_PASSWORD", "PYEMBED_REPLICATION_PASSWORD",
                "PYEMBED_OWNER_DSN", "PYEMBED_DSN", "GF_SECURITY_ADMIN_PASSWORD"):
        assert var in defined, var
    assert "@db:5432/pyembed" in defined["PYEMBED_DSN"]


def _literal(value: str) -> bool:
    return not re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}|/run/secrets/\S+", value)


def test_no_password_is_written_in_compose_yaml() -> None:
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", COMPOSE_TEXT), "a DSN with a password"
    for m in re.finditer(r"(\w*(?:PASSWORD|SECRET|TOKEN|API_KEY|_DSN)\w*)\s*[:=]\s*\"?([^\s\"#]+)",
                         COMPOSE_TEXT):
        assert m.group(1).endswith("_FILE") or not _literal(m.group(2)), m.group(0)
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|DSN")
    for name, service in SERVICES.items():
        env = service.get("environment", {})
        if isinstance(env, list):
            env = dict([*e.split("=", 1), ""][:2] for e in env)
        for key, value in env.items():
            if sensitive.search(key) and not key.endswith("_FILE"):
                assert value in (None, "") or not _literal(str(value)), f"{name}: {key}"
    assert not _literal("${PYEMBED_DSN}") and _literal("hunter2")  # the check itself


# -- Dockerfiles and scripts ---------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ["Dockerfile", "pyembed.Dockerfile"])
def test_dockerfile_copy_sources_exist(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    copies = [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for words in copies:
        assert not any(w.startswith("--from") for w in words)
        for source in (w for w in words[:-1] if not w.startswith("--")):
            assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    assert re.search(r"^FROM \S+", text, re.M)


def test_shell_scripts_are_executable_and_parse() -> None:
    for script in ("pyembed-entrypoint.sh", "replica-entrypoint.sh", "initdb-docker.sh"):
        path = DOCKER / script
        assert os.access(path, os.X_OK), script
        shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
        assert _run([shell, "-n", str(path)]).returncode == 0, script


def test_pyembed_image_entrypoint_and_cmd() -> None:
    text = (DOCKER / "pyembed.Dockerfile").read_text()
    assert 'ENTRYPOINT ["pyembed-entrypoint"]' in text
    assert "COPY docker/pyembed-entrypoint.sh /usr/local/bin/pyembed-entrypoint" in text
    assert "pip install --no-cache-dir /src/pyembed" in text
    assert "pyembed-replica-entrypoint" in (DOCKER / "Dockerfile").read_text()


def test_worker_help_runs_here() -> None:
    out = _run([sys.executable, "-m", "pyembed", "worker", "--help"])
    assert out.returncode == 0, out.stderr
    assert "--forever" in out.stdout


@pytest.mark.parametrize("service", PYEMBED_SERVICES)
def test_service_command_runs_here_through_the_entrypoint(service: str) -> None:
    """The exact command of the service, with --help appended, through the image's
    entrypoint script, with `pyembed` the one this repository's venv installed."""
    command = SERVICES[service]["command"]
    assert command[0] == "pyembed"
    out = _run(["sh", str(DOCKER / "pyembed-entrypoint.sh"), *command, "--help"])
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout and "--dsn" in out.stdout


def test_entrypoint_reads_dsns_from_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "app_dsn"
    secret.write_text("postgresql://app:s3cret@db/pyembed\n")
    out = _run(["sh", str(DOCKER / "pyembed-entrypoint.sh"), "sh", "-c",
                'printf "%s|%s" "$PYEMBED_DSN" "${PYEMBED_DSN_FILE:-unset}"'],
               {"PYEMBED_DSN_FILE": str(secret)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "postgresql://app:s3cret@db/pyembed|unset"
    out = _run(["sh", str(DOCKER / "pyembed-entrypoint.sh"), "true"],
               {"PYEMBED_OWNER_DSN_FILE": str(tmp_path / "missing")})
    assert out.returncode == 1 and "PYEMBED_OWNER_DSN_FILE" in out.stderr


def test_the_stacks_worker_logs_in_as_a_member_of_pyembed_worker(tmp_path: Path) -> None:
    """Only members of pyembed_worker count failed provider calls (revision 0026): the stack's
    worker logs in as one (its DSN first, from the env file or a secret file), the
    application login, which every app session uses, does not. Before, the worker ran as the
    application login and counted nothing."""
    roles = {m.group(1): {r.strip() for r in (m.group(2) or "").split(",")}
             for m in re.finditer(r"CREATE ROLE (\w+) LOGIN(?: IN ROLE ([\w, ]+))?;",
                                  (DOCKER / "initdb.sql").read_text())}
    example = dict(line.split("=", 1) for line in (DOCKER / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    worker = re.match(r"postgresql://(\w+):", example["PYEMBED_WORKER_DSN"])
    app = re.match(r"postgresql://(\w+):", example["PYEMBED_DSN"])
    assert worker and app
    assert "pyembed_worker" in roles[worker.group(1)] and "pyembed_app" in roles[worker.group(1)]
    assert "pyembed_worker" not in roles[app.group(1)]
    # The one worker and exporter act for every tenant (revision 0037); no app session may.
    assert "pyembed_operator" in roles[worker.group(1)]
    assert "pyembed_operator" not in roles[app.group(1)]
    assert f"-m pyembed.passwords {worker.group(1)}" in (DOCKER / "initdb-docker.sh").read_text()
    assert "PYEMBED_WORKER_PASSWORD" in example
    secret = tmp_path / "worker_dsn"
    secret.write_text("postgresql://w:s3cret@db/pyembed\n")
    out = _run(["sh", str(DOCKER / "pyembed-entrypoint.sh"), "sh", "-c",
                'printf "%s" "$PYEMBED_WORKER_DSN"'], {"PYEMBED_WORKER_DSN_FILE": str(secret)})
    assert out.returncode == 0 and out.stdout == "postgresql://w:s3cret@db/pyembed", out


def test_the_first_start_stops_without_the_logins_passwords(tmp_path: Path) -> None:
    """initdb.sql creates the application and worker logins without a password (it had a
    placeholder, known to anyone reading this repository, which an env file without
    PYEMBED_APP_PASSWORD or PYEMBED_WORKER_PASSWORD kept on the published port), and
    initdb-docker.sh sets each from the env file. The first start stops in one line naming a
    missing variable, before anything runs (a `psql` and a `python` here that record their calls
    stay uncalled); with both set, each login's password is set through pyembed.passwords, the
    password on its standard input (test_secrets_in_logs runs the script against a server)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("psql", "python"):
        (fake / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\ncat >> {calls}\n')
        (fake / name).chmod(0o755)
    both = {"PYEMBED_APP_PASSWORD": "a-pw", "PYEMBED_WORKER_PASSWORD": "w-pw",
            "PYEMBED_PYTHON": str(fake / "python")}
    script = str(DOCKER / "initdb-docker.sh")
    for unset in ("PYEMBED_APP_PASSWORD", "PYEMBED_WORKER_PASSWORD"):
        env = _env({**{k: v for k, v in both.items() if k != unset}, "POSTGRES_USER": "postgres",
                    "PGDATA": str(tmp_path), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
        env.pop(unset, None)
        out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode != 0 and f"{unset}: set it in docker/pyembed.env" in out.stderr
        assert not calls.exists()
    env = _env({**both, "POSTGRES_USER": "postgres", "PGDATA": str(tmp_path),
                "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    out = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert calls.read_text() == ("python -m pyembed.passwords pyembed_user\na-pw\n"
                                 "python -m pyembed.passwords pyembed_worker_user\nw-pw\n")
    assert "PASSWORD" not in (DOCKER / "initdb.sql").read_text()


# -- the dashboard against `pyembed metrics serve` -----------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label matchers,
    grouping labels, durations, strings and numbers removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            yield f"variable {var['name']}", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (corpus) (rate(a_total{x="y{z}"}[5m])) / ignoring(w) b > 0') == {
        "a_total", "b"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (c_bucket))") == {"c_bucket"}


def test_dashboard_is_a_grafana_dashboard() -> None:
    assert DASHBOARD["uid"] == "pyembed" and DASHBOARD["panels"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for wanted in ("coverage", "queue depth", "24 h baseline", "cache hit rate", "p50", "p95",
                   "provider errors", "429s", "cost per tenant"):
        assert wanted in titles, wanted
    for panel in DASHBOARD["panels"]:
        assert panel["type"] == "text" or panel["targets"], panel["title"]


def _exported(body: str) -> dict[str, list[set[str]]]:
    """Metric name -> the label sets of its samples, from the text exposition format."""
    found: dict[str, list[set[str]]] = {}
    for line in body.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? ", line)
        if m:
            labels = set(re.findall(r'(\w+)="', m.group(3) or ""))
            found.setdefault(m.group(1), []).append(labels)
    return found


@pytest.fixture
def metrics_body(db: Database) -> str:
    """/metrics of `pyembed metrics serve` on a database with a corpus, vectors, searches
    (latency, cache hits), a recall measurement and a queued chunk, so that every family has samples."""
    with pyembed.connect(db.app_dsn) as client:
        kb = client.create_corpus("kb", FAKE)
        kb.add([("a", "alpha text"), ("b", "beta text")])
        for _ in range(2):
            kb.search("alpha", k=1)
        kb.search("alpha", k=1, mode="hybrid")
        client.conn.execute("SELECT pyembed.add_document('kb', 'c', 'gamma text waiting')")
        client.conn.execute("SELECT * FROM pyembed.measure_recall('kb', 2)")
    port = free_port()
    command = [str(VENV_BIN / "pyembed"), *SERVICES["metrics"]["command"][1:]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--address") + 1] = "127.0.0.1"  # 0.0.0.0 in the container
    proc = subprocess.Popen(command, cwd=REPO, env=_env({"PYEMBED_DSN": db.app_dsn}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        body = scrape_metrics(port, proc, 30)
        # the compose healthcheck's own command passes against it
        check = list(SERVICES["metrics"]["healthcheck"]["test"][1:])
        check[0] = sys.executable
        check[-1] = check[-1].replace("9187", str(port))
        assert subprocess.run(check, timeout=30).returncode == 0
        return body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_dashboard_metric_is_exported(metrics_body: str) -> None:
    exported = _exported(metrics_body)
    assert "pyembed_up" in exported and "pyembed_up 1.0" in metrics_body
    queried: dict[str, str] = {}
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        for name in names:
            queried.setdefault(name, title)
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in exported or f"{base}_bucket" in exported or base in exported, (
                f"panel {title!r} queries {name}, which pyembed metrics serve does not export")
        # the labels a query matches or groups by are labels of the metrics it selects
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", expr))))
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used |= {g.strip() for g in group.split(",") if g.strip()}
        have = set().union(*(labels for n in names for labels in exported.get(n, [])))
        assert used <= have, f"{title}: labels {used - have} are not on {names}"
    assert set(queried) >= {"pyembed_coverage_ratio", "pyembed_queue_depth",
                            "pyembed_embeddings_per_second", "pyembed_cache_hits_total",
                            "pyembed_cache_misses_total", "pyembed_latency_seconds",
                            "pyembed_provider_errors_total", "pyembed_cost_usd_30d",
                            "pyembed_recall_at_10"}
