"""albor.track: what training runs did, recorded and shown.

metrics.py  metrics.jsonl, the per-step log in a run dir: its one writer and reader
runs.py     the run database (WORKDIR/runs.db, SQLite): `RunTracker` for the training loop,
            `import_run_dir` for runs made without it, the queries behind `albor runs`
monitor.py  `albor monitor`'s live dashboard and the views of `albor runs ls|show|diff`
plot.py     sparklines and braille charts for the terminal; `loss.png` (optional matplotlib)
"""
