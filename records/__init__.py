"""Tools for record submissions: `python -m records {new,validate,compare,diff,plot}`.

The run-log format they read is docs/interfaces.md; the parser is records.logparse.parse_log.
"""
