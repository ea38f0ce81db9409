"""The registry tests of test_registry.py, run again against an `mlflow server` backed by
PostgreSQL, the store users deploy (k8s/components/mlflow-postgres, docs/mlflow.md), instead of
SQLite: a real cluster from Debian's `postgresql` package on 127.0.0.1, started here, stopped at
teardown. The server gets its database credentials the way the Deployment does: PGUSER and
PGPASSWORD in its environment, none in the URI."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import test_registry as on_sqlite
from mlflow_server import POSTGRES_MISSING, postgres_bindir, start_postgres, start_server

# Collected here, with this module's mlflow_server, in test_registry.py's order.
fake_animator = on_sqlite.fake_animator
test_register_promote_reject_rollback_and_load = on_sqlite.test_register_promote_reject_rollback_and_load
test_racing_promotions_leave_a_consistent_alias = on_sqlite.test_racing_promotions_leave_a_consistent_alias
test_lock_held_times_out_and_a_stale_lock_is_broken = on_sqlite.test_lock_held_times_out_and_a_stale_lock_is_broken
test_bad_input_gives_clear_errors_and_leaves_the_alias = on_sqlite.test_bad_input_gives_clear_errors_and_leaves_the_alias

pytestmark = pytest.mark.skipif(postgres_bindir() is None, reason=POSTGRES_MISSING)
DEPLOYMENT_PATCH = Path(__file__).resolve().parents[1] / "k8s" / "components" / "mlflow-postgres" / "mlflow-server.yaml"


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary (test extra)")
    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def mlflow_server(postgres):
    """Overrides conftest's SQLite server for every test in this module."""
    server = start_server(backend_store_uri=postgres.uri, env=postgres.env)
    yield server
    server.stop()


def test_runs_and_models_land_in_postgres_and_artifacts_on_the_server(postgres, mlflow_server, tmp_path):
    import mlflow
    import psycopg2

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    uid = uuid.uuid4().hex[:8]
    run = client.create_run(client.create_experiment(f"pg-{uid}"))
    (tmp_path / "note.txt").write_text(f"hello {uid}")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.log_metric(run.info.run_id, "x", 0.25)
    client.create_registered_model(f"pg-model-{uid}")

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients need no storage access
    served = list((mlflow_server.root / "artifacts").rglob("note.txt"))
    assert [p.read_text() for p in served] == [f"hello {uid}"]
    assert not list(mlflow_server.root.glob("*.db"))  # no SQLite store on the side
    env = postgres.env
    with psycopg2.connect(host="127.0.0.1", port=postgres.port, dbname="mlflow", user=env["PGUSER"], password=env["PGPASSWORD"]) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM registered_models WHERE name = %s", (f"pg-model-{uid}",))
            assert cur.fetchall() == [(f"pg-model-{uid}",)]
            cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'x'", (run.info.run_id,))
            assert cur.fetchall() == [(0.25,)]
            cur.execute("SELECT version_num FROM alembic_version")
            assert len(cur.fetchall()) == 1  # the server migrated the schema itself
    conn.close()


def test_the_server_here_is_configured_like_the_deployment(postgres, mlflow_server):
    """Same driver scheme, no credentials in the URI, the login as libpq environment."""
    c = yaml.safe_load(DEPLOYMENT_PATCH.read_text())["spec"]["template"]["spec"]["containers"][0]
    deployed = urlsplit(next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--backend-store-uri=")))
    here = urlsplit(postgres.uri)
    assert deployed.scheme == here.scheme == "postgresql+psycopg2"
    assert (deployed.username, deployed.password, here.username, here.password) == (None,) * 4
    assert deployed.path == here.path == "/mlflow"
    assert {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})} == set(postgres.env)
