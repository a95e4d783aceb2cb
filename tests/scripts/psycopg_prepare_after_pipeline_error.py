#!/usr/bin/env python3
"""psycopg 3 binds a prepared statement whose Parse PostgreSQL skipped after a
pipeline error, when the error reaches it late (InvalidSqlStatementName).

Run against PostgreSQL directly (no pgferry) to see that the failure is
psycopg's own; it needs a busy CPU to make the error arrive late, e.g. two
`sh -c 'while :; do :; done' &` loops beside it:

    python3 psycopg_prepare_after_pipeline_error.py HOST PORT USER PASSWORD DBNAME

Prints "fails N" (pipelines that raised InvalidSqlStatementName, of 300).
Measured here (session 6, PostgreSQL 15, psycopg 3.3.9): 9 of 300 with two
busy loops, 0 when idle. Through pgferry the extra hop makes it more common,
which is why tests/tests/pipeline_boundaries.rs runs psycopg with
prepare_threshold=None.
"""
import sys, threading, time
import psycopg

host, port, user, password, dbname = sys.argv[1:6]
args = dict(host=host, port=int(port), user=user, password=password, dbname=dbname, autocommit=True)
with psycopg.connect(**args) as c:
    c.execute("CREATE TABLE IF NOT EXISTS psycopg_repro (marker text, n int)")

stop = False
def bystander():
    with psycopg.connect(**args) as b:
        while not stop:
            b.execute("SELECT 1").fetchone()
threads = [threading.Thread(target=bystander) for _ in range(3)]
for t in threads:
    t.start()
fails = 0
try:
    for rnd in range(20):
        with psycopg.connect(**args) as c:
            for bad in range(5):
                for sync_after in (None, 1, 3):
                    try:
                        with c.pipeline() as p:
                            curs = []
                            for k in range(5):
                                if k == bad:
                                    curs.append(c.execute("SELECT 1/0"))
                                else:
                                    curs.append(c.execute(
                                        "INSERT INTO psycopg_repro VALUES (%s, %s) RETURNING n", ("m", k)))
                                if sync_after == k:
                                    p.sync()
                                time.sleep(0.001)
                            for cur in curs:
                                try:
                                    cur.fetchone()
                                except Exception:
                                    pass
                    except psycopg.errors.DivisionByZero:
                        pass
                    except psycopg.errors.InvalidSqlStatementName as e:
                        print("ERR", e)
                        fails += 1
finally:
    stop = True
    for t in threads:
        t.join()
print("fails", fails)
