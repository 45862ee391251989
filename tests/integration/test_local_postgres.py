"""The fallback cluster that tests, benchmarks and `workflowd dev` start on their own."""

from __future__ import annotations

import psycopg

from daemon.local_postgres import LocalPostgres


def test_a_temporary_cluster_starts_serves_and_is_removed() -> None:
    with LocalPostgres.temporary() as cluster:
        data_dir = cluster.data_dir
        with psycopg.connect(cluster.url()) as conn:
            row = conn.execute(
                "SELECT current_setting('server_encoding'), current_setting('fsync')"
            ).fetchone()
        assert row == ("UTF8", "on")  # durable unless asked otherwise
    assert not data_dir.exists()
