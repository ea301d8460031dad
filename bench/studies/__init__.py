"""Studies: one-off measurements behind the tables in docs/ (`python -m
kvant.bench.studies.NAME`). Each writes a JSON file that `tools/render_docs.py` turns into
its table. Nothing else imports them.
"""
