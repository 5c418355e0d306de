"""albor.track: what training runs did, recorded and shown.

metrics.py   metrics.jsonl, the per-step log in a run dir: its one writer and reader
runs.py      the run database (WORKDIR/runs.db, SQLite) and `RunTracker` for the training loop
importer.py  finished run dirs made without tracking, into the database; `prepare` for `albor runs`
queries.py   what `albor runs ls|show|diff` and the monitor read from the database
monitor.py   the live state of a run dir (`Monitor.poll` -> `Snapshot`) for `albor monitor`
views.py     rich views: the live dashboard and the tables of `albor runs ls|show|diff`
plot.py      sparklines and braille charts for the terminal; `loss.png` (matplotlib)
"""
