"""The shop database: customers, products, orders, built deterministically from a seed in
memory and then locked read-only (an authorizer that allows reading and nothing else, plus
SQLite's own `query_only`, a value-length limit, and a time limit per query)."""

from __future__ import annotations

import random
import sqlite3
import time
from datetime import date, timedelta

SCHEMA = {
    "customers": "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, "
                 "signup_date TEXT NOT NULL)",
    "products": "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, "
                "price REAL NOT NULL)",
    "orders": "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id), "
              "product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, "
              "order_date TEXT NOT NULL)",
}
CITIES = ["Lisbon", "Porto", "Madrid", "Lyon", "Turin", "Ghent", "Krakow", "Bergen"]
CATEGORIES = {
    "books": ["Atlas", "Cookbook", "Novel", "Field Guide", "Poetry Collection", "Dictionary"],
    "garden": ["Trowel", "Watering Can", "Seed Kit", "Pruner", "Planter", "Hose"],
    "kitchen": ["Kettle", "Skillet", "Whisk", "Teapot", "Knife Set", "Mixing Bowl"],
    "toys": ["Kite", "Puzzle", "Yo-yo", "Robot Kit", "Board Game", "Marble Run"],
}
FIRST = ["Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Luis", "Mona", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara"]
LAST = ["Almeida", "Berg", "Costa", "Dubois", "Esposito", "Fischer", "Garcia", "Hansen", "Ivanova", "Jensen",
        "Kowalski", "Lopes", "Moreau", "Novak", "Olsen", "Pereira"]

#: Most rows one query returns to the model, and the longest one query may run.
MAX_ROWS = 50
QUERY_TIME_S = 1.0
_MAX_VALUE_BYTES = 100_000

_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                           sqlite3.SQLITE_RECURSIVE})


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def _fill(conn: sqlite3.Connection, seed: int) -> None:
    rng = random.Random(f"shop:{seed}")
    for ddl in SCHEMA.values():
        conn.execute(ddl)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], rng.randint(16, 24))
    start = date(2023, 1, 1)
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", [
        (i + 1, name, rng.choice(CITIES), (start + timedelta(days=rng.randrange(365))).isoformat())
        for i, name in enumerate(names)
    ])
    # distinct prices (in cents) so "the most expensive" is always one product
    products = [(item, cat) for cat, items in CATEGORIES.items() for item in rng.sample(items, rng.randint(3, 5))]
    cents = rng.sample(range(299, 15000), len(products))
    conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", [
        (i + 1, item, cat, c / 100) for i, ((item, cat), c) in enumerate(zip(products, cents))
    ])
    year = date(2024, 1, 1)
    buyers = rng.sample(range(1, len(names) + 1), len(names) - rng.randint(2, 5))  # some never order
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", [
        (i + 1, rng.choice(buyers), rng.randint(1, len(products)), rng.randint(1, 5),
         (year + timedelta(days=rng.randrange(366))).isoformat())
        for i in range(rng.randint(60, 90))
    ])
    conn.commit()


def open_database(seed: int) -> sqlite3.Connection:
    """A fresh in-memory shop for `seed`, already read-only. Usable from any one thread at a time."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    _fill(conn, seed)
    conn.execute("PRAGMA query_only = ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
    conn.set_authorizer(_authorize)
    return conn


def run_select(conn: sqlite3.Connection, sql: str, params: tuple[object, ...] = (), *,
               max_rows: int = MAX_ROWS, time_s: float = QUERY_TIME_S) -> tuple[list[str], list[tuple], bool]:
    """(columns, up to max_rows rows, whether more were cut). sqlite3.Error on a bad, writing,
    or too slow query ("interrupted")."""
    deadline = time.monotonic() + time_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        cursor = conn.execute(sql, params)
        rows = cursor.fetchmany(max_rows + 1)
        columns = [d[0] for d in cursor.description or ()]
    finally:
        conn.set_progress_handler(None, 0)
    return columns, rows[:max_rows], len(rows) > max_rows
