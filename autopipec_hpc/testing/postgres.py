"""A fresh database on the test PostgreSQL server of scripts/postgres/up.sh (tests, benchmarks)."""

from __future__ import annotations

import uuid


def new_database(server_url: str, prefix: str = "t") -> str:
    """Create an empty database beside ``server_url``'s and return its URL."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(server_url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return server_url.rsplit("/", 1)[0] + "/" + name
